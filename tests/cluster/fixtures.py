"""pytest fixtures for the real test cluster (registered in tests/conftest.py).

- k8s_cluster (session): a started ControlPlane: .kubeconfig, .server,
  .kubectl(*args), .api_client(user=/token=), .rest(), .service_account_token()
- make_kubelet (function): factory for TestKubelets (a Node each), stopped after
- test_kubelet (function): one TestKubelet; size it with
  @pytest.mark.test_kubelet(gpus=4, cpu="8", memory="32Gi")
- sa_token (session): sa_token(namespace, name) -> a token for that ServiceAccount
- k8s_namespace (function): a fresh namespace, deleted afterwards
"""
from __future__ import annotations

import itertools
import time
import uuid

import pytest

from tests.cluster.control_plane import ControlPlane
from tests.cluster.kubelet import TestKubelet
from tests.cluster.rest import ApiError
from tests.cluster.tools import bin_dir
from tests.cluster.waiting import wait_until

_report: list[str] = []
_node_numbers = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "test_kubelet(**kwargs): arguments for the test_kubelet "
                                       "fixture's TestKubelet (gpus, cpu, memory, max_pods...)")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the cluster tools (if the cache is cold) before any test's timeout starts,
    and only when a selected test needs the cluster."""
    if session.config.option.collectonly:
        return
    if any("k8s_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        capture = session.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():  # show the build's progress
            started = time.monotonic()
            tools = bin_dir()
        _report.append(f"tools in {tools} ready in {time.monotonic() - started:.1f} s")


def pytest_terminal_summary(terminalreporter) -> None:
    if _report:
        terminalreporter.section("kubetune test cluster")
        for line in _report:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def k8s_cluster():
    bin_dir()  # normally already done at collection (hack/cluster-tools.sh, cached)
    cluster = ControlPlane()
    cluster.start()
    _report.append(cluster.timings.summary())
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_kubelet(k8s_cluster):
    kubelets: list[TestKubelet] = []

    def make(name: str | None = None, **kwargs) -> TestKubelet:
        kubelet = TestKubelet(k8s_cluster, name or f"test-node-{next(_node_numbers)}", **kwargs)
        kubelets.append(kubelet)
        return kubelet.start()

    try:
        yield make
    finally:
        for kubelet in kubelets:
            kubelet.stop()
            if kubelet.errors:  # retried, so not fatal; but worth a look
                _report.append(f"test kubelet {kubelet.name}: {len(kubelet.errors)} failed sync "
                               f"pass(es), last:\n{kubelet.errors[-1]}")


@pytest.fixture
def test_kubelet(request, make_kubelet) -> TestKubelet:
    marker = request.node.get_closest_marker("test_kubelet")
    return make_kubelet(**(marker.kwargs if marker else {}))


@pytest.fixture(scope="session")
def sa_token(k8s_cluster):
    def issue(namespace: str, name: str, **kwargs) -> str:
        return k8s_cluster.service_account_token(namespace, name, **kwargs)
    return issue


@pytest.fixture
def k8s_namespace(k8s_cluster) -> str:
    name = f"test-{uuid.uuid4().hex[:8]}"
    admin = k8s_cluster.rest()
    admin.post("/api/v1/namespaces", {"metadata": {"name": name}})
    # Pods need the namespace's default ServiceAccount (made by the controller-manager).
    wait_until(lambda: admin.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 30,
               f"ServiceAccount {name}/default")
    try:
        yield name
    finally:
        # Delete pods first so no kubelet picks up a leftover Pending one, then the rest.
        try:
            admin.request("DELETE", f"/api/v1/namespaces/{name}/pods",
                          body={"gracePeriodSeconds": 0})
            admin.delete(f"/api/v1/namespaces/{name}")
        except ApiError as error:
            if error.status != 404:
                raise
