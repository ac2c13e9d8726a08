"""RBAC is enforced: a ServiceAccount gets what its Role grants, nothing more."""
import kubernetes.client
import pytest

from tests.cluster.helpers import manifest


def test_namespaced_role_allows_its_namespace_only(k8s_cluster, sa_token):
    admin = k8s_cluster.rest()
    for ns in ("team-a", "team-b"):
        admin.post("/api/v1/namespaces", {"metadata": {"name": ns}})
    try:
        role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "pod-reader", "namespace": "team-a"},
                "rules": [{"apiGroups": [""], "resources": ["pods"],
                           "verbs": ["get", "list", "watch"]}]}
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "tuner-reads-pods", "namespace": "team-a"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                               "name": "pod-reader"},
                   "subjects": [{"kind": "ServiceAccount", "name": "tuner",
                                 "namespace": "team-a"}]}
        secret = {"apiVersion": "v1", "kind": "Secret",
                  "metadata": {"name": "db", "namespace": "team-b"},
                  "stringData": {"password": "x"}}
        k8s_cluster.kubectl("apply", "-f", "-", input=manifest(role, binding, secret))
        token = sa_token("team-a", "tuner")

        sa = "system:serviceaccount:team-a:tuner"

        def can_i(*args: str) -> str:
            result = k8s_cluster.kubectl("auth", "can-i", *args, f"--as={sa}", check=False)
            return result.stdout.strip()

        assert can_i("list", "pods", "-n", "team-a") == "yes"
        assert can_i("get", "secrets", "-n", "team-b") == "no"
        assert can_i("list", "pods", "-n", "team-b") == "no"

        # Real requests with the ServiceAccount's own token, through the typed client.
        core = kubernetes.client.CoreV1Api(k8s_cluster.api_client(token=token))
        core.list_namespaced_pod("team-a")
        with pytest.raises(kubernetes.client.ApiException) as refused:
            core.read_namespaced_secret("db", "team-b")
        assert refused.value.status == 403

        # And kubectl with a kubeconfig holding only that token.
        config = k8s_cluster.write_kubeconfig(k8s_cluster.workdir / "tuner.kubeconfig", "tuner",
                                              token=token)
        assert k8s_cluster.kubectl("get", "pods", "-n", "team-a", kubeconfig=config).returncode == 0
        denied = k8s_cluster.kubectl("get", "secret", "db", "-n", "team-b", kubeconfig=config,
                                     check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    finally:
        for ns in ("team-a", "team-b"):
            admin.delete(f"/api/v1/namespaces/{ns}")
