"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and
kube-controller-manager, with certificates, RBAC and Node authorisation, service
account token signing and the usual admission plugins, as a real cluster has them.

Outside pytest:  python -m tests.cluster.control_plane up
prints the admin kubeconfig path and keeps the cluster up until Ctrl-C.
"""
from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes.client
import yaml

from tests.cluster import processes
from tests.cluster.pki import CertificateAuthority, KeyPair, rsa_key_pair
from tests.cluster.rest import ApiError, Rest
from tests.cluster.tools import tool
from tests.cluster.waiting import GiveUp, wait_until

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/16"
API_SERVER_HOSTS = ("127.0.0.1", "localhost", "10.96.0.1", "kubernetes", "kubernetes.default",
                    "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")
START_TIMEOUT = 90.0


@dataclass
class ControlPlaneTimings:
    """Seconds from start() to each component being ready."""
    certificates: float = 0.0
    etcd: float = 0.0
    apiserver: float = 0.0
    controller_manager: float = 0.0

    @property
    def total(self) -> float:
        return self.controller_manager

    def summary(self) -> str:
        return (f"test cluster ready in {self.total:.1f} s (certificates {self.certificates:.1f} s,"
                f" etcd {self.etcd:.1f} s, kube-apiserver {self.apiserver:.1f} s,"
                f" kube-controller-manager {self.controller_manager:.1f} s)")


@dataclass
class ControlPlane:
    # How long a silent node stays Ready, and how long pods stay on a NotReady or
    # unreachable node before eviction (defaults: 50 s, 300 s); short here so that
    # node-failure tests run quickly.
    node_monitor_grace_period: str = "8s"
    eviction_toleration_seconds: int = 10
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kubetune-k8s-")))
    timings: ControlPlaneTimings = field(default_factory=ControlPlaneTimings)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.pki_dir = self.workdir / "pki"
        self.log_dir = self.workdir / "logs"
        self.ca: CertificateAuthority | None = None
        self.server = ""
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self._processes: dict[str, subprocess.Popen] = {}
        self._client_certs: dict[tuple, KeyPair] = {}
        self._cert_lock = threading.Lock()

    # ----- lifecycle -------------------------------------------------------------

    def start(self) -> "ControlPlane":
        started = time.monotonic()
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            etcd_port, etcd_peer_port, apiserver_port, kcm_port = processes.free_loopback_ports(4)
            self.server = f"https://127.0.0.1:{apiserver_port}"
            self._make_certificates()
            self.timings.certificates = time.monotonic() - started

            self._start_etcd(etcd_port, etcd_peer_port)
            self.timings.etcd = time.monotonic() - started
            self._start_apiserver(apiserver_port, etcd_port)
            self.timings.apiserver = time.monotonic() - started
            self._start_controller_manager(kcm_port)
            self.timings.controller_manager = time.monotonic() - started
        except BaseException:
            logs = self.log_tails()
            self.stop()
            print(f"test cluster failed to start; component logs:\n{logs}", file=sys.stderr)
            raise
        return self

    def stop(self) -> None:
        """Stop every component (controller-manager first, etcd last) and delete the data."""
        for name in reversed(list(self._processes)):
            processes.stop(self._processes.pop(name), grace_seconds=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        """The process id of each running component (etcd, kube-apiserver, kube-controller-manager)."""
        return {name: process.pid for name, process in self._processes.items()}

    def log_tails(self, lines: int = 20) -> str:
        return "\n".join(f"--- {p.name} ---\n{processes.log_tail(p, lines)}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        process = processes.spawn(argv, self.log_dir / f"{name}.log")
        self._processes[name] = process
        return process

    def _alive(self, name: str) -> bool:
        code = self._processes[name].poll()
        if code is not None:
            raise GiveUp(f"{name} exited with {code}:\n"
                               f"{processes.log_tail(self.log_dir / f'{name}.log')}")
        return True

    # ----- certificates ------------------------------------------------------------

    def _make_certificates(self) -> None:
        self.ca = CertificateAuthority(self.pki_dir)
        self.apiserver_cert = self.ca.server("apiserver", "kube-apiserver", API_SERVER_HOSTS)
        # The API server's identity towards kubelets (for logs, exec, port-forward).
        self.kubelet_client_cert = self.ca.client("apiserver-kubelet-client",
                                                  "kube-apiserver-kubelet-client",
                                                  ("system:masters",))
        self.sa_private_key = self.pki_dir / "service-account.key"
        self.sa_public_key = self.pki_dir / "service-account.pub"
        rsa_key_pair(self.sa_private_key, self.sa_public_key)
        admin = self.client_cert("kubetune-admin", ("system:masters",))
        self.write_kubeconfig(self.kubeconfig, "kubetune-admin", cert=admin)

    def client_cert(self, user: str, groups: tuple[str, ...] = ()) -> KeyPair:
        """A client certificate for user in groups (what real components use)."""
        with self._cert_lock:
            key = (user, tuple(groups))
            if key not in self._client_certs:
                safe = user.replace(":", "-")
                self._client_certs[key] = self.ca.client(f"client-{safe}", user, tuple(groups))
            return self._client_certs[key]

    def write_kubeconfig(self, path: Path, user: str, *, cert: KeyPair | None = None,
                         token: str | None = None) -> Path:
        credentials = ({"client-certificate": str(cert.cert), "client-key": str(cert.key)}
                       if cert else {"token": token})
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "kubetune-test", "cluster": {
                "server": self.server, "certificate-authority": str(self.ca.cert)}}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": user, "context": {"cluster": "kubetune-test", "user": user}}],
            "current-context": user,
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # ----- components ----------------------------------------------------------------

    def _start_etcd(self, port: int, peer_port: int) -> None:
        client_url, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
        self._spawn("etcd", [
            tool("etcd"), "--name=test", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}", "--initial-cluster-state=new",
            # Throw-away data: skipping fsync makes every API write much faster.
            "--unsafe-no-fsync", "--log-level=warn",
        ])

        def healthy() -> bool:
            self._alive("etcd")
            with urllib.request.urlopen(f"{client_url}/health", timeout=2) as response:
                return b'"health":"true"' in response.read()

        wait_until(healthy, START_TIMEOUT, "etcd /health")

    def _start_apiserver(self, port: int, etcd_port: int) -> None:
        pki = self.pki_dir
        self._spawn("kube-apiserver", [
            tool("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            f"--tls-cert-file={self.apiserver_cert.cert}",
            f"--tls-private-key-file={self.apiserver_cert.key}",
            f"--client-ca-file={self.ca.cert}",
            "--authorization-mode=Node,RBAC",
            # The default plugins (NamespaceLifecycle, ServiceAccount, LimitRanger,
            # DefaultTolerationSeconds, ResourceQuota, PodSecurity, ...) plus the
            # one that confines each kubelet to its own Node and Pods.
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={self.sa_public_key}",
            f"--service-account-signing-key-file={self.sa_private_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--kubelet-client-certificate={self.kubelet_client_cert.cert}",
            f"--kubelet-client-key={self.kubelet_client_cert.key}",
            f"--kubelet-certificate-authority={self.ca.cert}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--cert-dir={pki / 'apiserver-generated'}",
            f"--default-not-ready-toleration-seconds={self.eviction_toleration_seconds}",
            f"--default-unreachable-toleration-seconds={self.eviction_toleration_seconds}",
            "--allow-privileged=true", "--profiling=false",
            # The endpoint reconciler refuses a loopback advertise address; pods here
            # reach the API server through KUBERNETES_SERVICE_HOST=127.0.0.1 instead.
            "--endpoint-reconciler-type=none",
        ])
        ca_context = ssl.create_default_context(cafile=str(self.ca.cert))

        def ready() -> bool:
            self._alive("kube-apiserver")
            # /readyz is open to anonymous users (system:public-info-viewer) and
            # only turns 200 once the RBAC bootstrap policy and the rest are in place.
            with urllib.request.urlopen(f"{self.server}/readyz", timeout=5,
                                        context=ca_context) as response:
                return response.status == 200

        wait_until(ready, START_TIMEOUT, "kube-apiserver /readyz", interval=0.2)

    def _start_controller_manager(self, port: int) -> None:
        # Its own identity, bound by the bootstrap policy to system:kube-controller-manager;
        # each controller then runs with its own service account's token.
        kcm_config = self.write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig", "system:kube-controller-manager",
            cert=self.client_cert("system:kube-controller-manager"))
        self._spawn("kube-controller-manager", [
            tool("kube-controller-manager"),
            f"--kubeconfig={kcm_config}",
            f"--authentication-kubeconfig={kcm_config}",
            f"--authorization-kubeconfig={kcm_config}",
            "--bind-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={self.pki_dir / 'controller-manager-generated'}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.sa_private_key}",
            f"--root-ca-file={self.ca.cert}",
            f"--cluster-signing-cert-file={self.ca.cert}",
            f"--cluster-signing-key-file={self.ca.key}",
            # All the default controllers: garbage collector, deployment, replicaset,
            # job, namespace, serviceaccount(-token), node lifecycle, pod GC, ...
            "--controllers=*",
            "--node-monitor-period=1s",
            f"--node-monitor-grace-period={self.node_monitor_grace_period}",
        ])
        insecure = ssl.create_default_context()  # its serving cert is self-signed
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        admin = self.rest()

        def ready() -> bool:
            self._alive("kube-controller-manager")
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=5,
                                        context=insecure) as response:
                if response.status != 200:
                    return False
            # Controllers really act: the serviceaccount controller made "default".
            return bool(admin.get("/api/v1/namespaces/default/serviceaccounts/default"))

        wait_until(ready, START_TIMEOUT, "kube-controller-manager /healthz and the default "
                                         "ServiceAccount", interval=0.2)

    # ----- clients -------------------------------------------------------------------

    def api_client(self, *, user: str | None = None, groups: tuple[str, ...] = (),
                   token: str | None = None) -> kubernetes.client.ApiClient:
        """An API client: admin by default, or as a user (client cert), or with a token."""
        config = kubernetes.client.Configuration(host=self.server, ssl_ca_cert=str(self.ca.cert))
        if token is not None:
            config.api_key = {"BearerToken": token}
            config.api_key_prefix = {"BearerToken": "Bearer"}
        else:
            cert = self.client_cert(user, groups) if user else self.client_cert(
                "kubetune-admin", ("system:masters",))
            config.cert_file, config.key_file = str(cert.cert), str(cert.key)
        return kubernetes.client.ApiClient(config)

    def rest(self, **identity) -> Rest:
        return Rest(self.api_client(**identity))

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the kubectl built for these tests (never one from PATH) against this cluster."""
        argv = [tool("kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, argv, result.stdout,
                                                result.stderr)
        return result

    def service_account_token(self, namespace: str, name: str, *, create: bool = True,
                              expiration_seconds: int = 3600,
                              audiences: tuple[str, ...] = ()) -> str:
        """A token for the ServiceAccount, issued by the TokenRequest API (as for a pod)."""
        admin = self.rest()
        base = f"/api/v1/namespaces/{namespace}/serviceaccounts"
        if create:
            try:
                admin.post(base, {"metadata": {"name": name}})
            except ApiError as error:
                if error.status != 409:
                    raise
        spec: dict = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        review = admin.post(f"{base}/{name}/token",
                            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                             "spec": spec})
        return review["status"]["token"]


def _serve_forever() -> None:
    with ControlPlane() as cluster:
        print(cluster.timings.summary(), file=sys.stderr)
        print(f"export KUBECONFIG={cluster.kubeconfig}", file=sys.stderr)
        print(cluster.kubeconfig, flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    if sys.argv[1:] != ["up"]:
        sys.exit("usage: python -m tests.cluster.control_plane up")
    _serve_forever()
