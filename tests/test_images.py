"""What the two Dockerfiles rely on, checked without a container engine (there is none here).

The control-plane image installs kubetune's wheel and runs `python -m kubetune.operator` or
`python -m kubetune.service`; the trial image installs the same wheel and copies the entrypoint and
the trainers. These tests build the wheel the way the image does, install it away from the checkout
and start both entrypoints from it, and check that every file the Dockerfiles copy exists. What they
cannot show is the image build itself (base images, pip inside them): that is left to a machine with
a container engine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "trial_image" / "Dockerfile"]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("image")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(work / "wheels"), str(ROOT)], check=True, capture_output=True, text=True)
    wheel = next((work / "wheels").glob("kubetune-*.whl"))
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    return target


def run_from(site: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` with the installed wheel first on the path and the checkout nowhere on it."""
    code = (f"import runpy, sys; sys.path.insert(0, {str(site)!r}); import kubetune; "
            f"assert kubetune.__file__.startswith({str(site)!r}), kubetune.__file__; "
            f"sys.argv = [{module!r}, *{list(args)!r}]; runpy.run_module({module!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env,
                          cwd=site.parent, timeout=60)


@pytest.mark.parametrize("module, expected", [("kubetune.operator", "--suggestion-url"),
                                              ("kubetune.service", "--redis-url"),
                                              ("kubetune.cli", "run")])
def test_the_installed_wheel_starts_each_entrypoint(installed_wheel, module, expected):
    got = run_from(installed_wheel, module, "--help")
    assert got.returncode == 0, got.stderr
    assert expected in got.stdout


def test_the_wheel_holds_every_kubetune_module(installed_wheel):
    shipped = {p.relative_to(installed_wheel).as_posix() for p in (installed_wheel / "kubetune").rglob("*.py")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kubetune").rglob("*.py")}
    assert source - shipped == set()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_file_a_dockerfile_copies_exists(dockerfile):
    copies = [line.split()[1:-1] for line in dockerfile.read_text().splitlines()
              if line.startswith("COPY ") and "--from=" not in line]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such file in the checkout"


def test_the_control_plane_image_runs_the_modules_the_chart_names():
    cmd = re.search(r'^CMD \["python", "-m", "([\w.]+)"\]', (ROOT / "Dockerfile").read_text(), re.M)
    assert cmd and cmd.group(1) == "kubetune.operator"
    chart = "\n".join(p.read_text() for p in (ROOT / "helm" / "kubetune" / "templates").glob("*.yaml"))
    assert "kubetune.operator" in chart and "kubetune.service" in chart


def test_the_trial_entrypoint_is_executable_and_runs_the_command(tmp_path):
    entry = ROOT / "trial_image" / "entrypoint.sh"
    assert os.access(entry, os.X_OK)
    got = subprocess.run([str(entry), "sh", "-c", "echo ran $0", "trial"], capture_output=True, text=True,
                         env={**os.environ, "KUBETUNE_TRIAL_DIR": str(tmp_path / "trial")}, timeout=120)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "trial").is_dir()
    assert "kubetune-trial: cuda available =" in got.stdout and got.stdout.rstrip().endswith("ran trial")
