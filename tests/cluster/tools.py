"""Where the test-cluster binaries live, building them when they are missing.

hack/cluster-tools.sh builds etcd, kube-apiserver, kube-controller-manager,
kubectl and helm at the releases in hack/k8s/versions.env and caches them in
$KUBETUNE_CACHE/k8s-<version>/; it returns at once when they are already built.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "k8s" / "versions.env"
BUILD_SCRIPT = REPO_ROOT / "hack" / "cluster-tools.sh"
TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")


def pinned_versions() -> dict[str, str]:
    versions = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key] = value
    return versions


@functools.cache
def bin_dir() -> Path:
    """The directory with all the tools, built (once per machine) if need be."""
    # The script is the one place that knows whether the cache is current
    # (it compares a key over go.mod/go.sum/flags); warm, it takes well under a second.
    result = subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    directory = Path(result.stdout.strip().splitlines()[-1])
    missing = [t for t in TOOLS if not os.access(directory / t, os.X_OK)]
    if missing:
        raise RuntimeError(f"{BUILD_SCRIPT} left {missing} missing in {directory}")
    return directory


def tool(name: str) -> str:
    """Absolute path of one tool (never /usr/bin/kubectl or another one on PATH)."""
    return str(bin_dir() / name)
