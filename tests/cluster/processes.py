"""Starting and stopping server processes, each in its own process group so that
stopping it also stops anything it started."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path


def free_loopback_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held open together so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def spawn(argv: list[str], log_path: Path, *, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start argv in a new session (its own process group), output to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass  # the whole group has already gone


def stop(process: subprocess.Popen, grace_seconds: float = 10.0) -> int:
    """SIGTERM the process group, SIGKILL it after the grace period; the exit code."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            pass
    # Also reaps children left behind by a leader that exited on SIGTERM.
    signal_group(process, signal.SIGKILL)
    return process.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
