"""A real redis-server for tests, on a free 127.0.0.1 port, stopped after the test.

Register with `pytest_plugins = ["tests.redis_server"]` in tests/conftest.py.
The server can be killed (SIGKILL) and restarted on the same port, with or
without its data, to test what survives.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path, *, appendonly: bool = True, password: str | None = None, tls: bool = False):
        """tls: serve TLS only, with a certificate for 127.0.0.1 from a throw-away CA (ca_file)."""
        self.dir = Path(workdir)
        self.appendonly, self.password = appendonly, password
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.ca_file: Path | None = None
        self._tls_args: list[str] = []
        if tls:
            from tests.cluster.pki import CertificateAuthority

            ca = CertificateAuthority(self.dir / "tls")
            pair = ca.server("redis", "127.0.0.1", ("127.0.0.1",))
            self.ca_file = ca.cert
            self._tls_args = ["--tls-cert-file", str(pair.cert), "--tls-key-file", str(pair.key),
                              "--tls-ca-cert-file", str(ca.cert), "--tls-auth-clients", "no"]

    @property
    def url(self) -> str:
        return f"{'rediss' if self.ca_file else 'redis'}://127.0.0.1:{self.port}/0"

    def client(self, **kw):
        """A redis-py client for this server (TLS verified against its CA when it serves TLS)."""
        import redis

        tls = {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self.ca_file else {}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **tls, **kw)

    def start(self, timeout_s: float = 15.0) -> None:
        fixed = self.port is not None
        for _ in range(5):
            if not fixed:
                self.port = free_port()
            data = self.dir / "data"
            data.mkdir(parents=True, exist_ok=True)
            ports = ["--port", "0", "--tls-port", str(self.port), *self._tls_args] if self.ca_file else ["--port", str(self.port)]
            args = ["redis-server", *ports, "--bind", "127.0.0.1", "--dir", str(data),
                    "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                    "--logfile", str(self.dir / "redis.log"), "--daemonize", "no"]
            if self.password:
                args += ["--requirepass", self.password]
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            if self._wait_ready(timeout_s) and self._is_ours():
                return
            self.stop()
            log = (self.dir / "redis.log").read_text(errors="replace") if (self.dir / "redis.log").exists() else ""
            if "Address already in use" not in log or fixed:
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")
        raise RuntimeError("redis-server found no free port")

    def _wait_ready(self, timeout_s: float) -> bool:
        """Until the server answers PING (or has exited), within a deadline."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with self._connection() as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return True
                    if reply.startswith(b"-LOADING"):
                        pass  # loading its append-only file: not ready yet
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _connection(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        if not self.ca_file:
            return s
        import ssl

        return ssl.create_default_context(cafile=str(self.ca_file)).wrap_socket(s, server_hostname="127.0.0.1")

    def _is_ours(self) -> bool:
        """The server answering on the port is the one started here, not another test's that took the port
        between free_port() and the start (ours then fails to bind and exits)."""
        with self.client(socket_timeout=5) as r:
            return r.info("server")["process_id"] == self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no chance to save anything more."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, keep_data: bool = True) -> None:
        self.kill()
        if not keep_data:
            shutil.rmtree(self.dir / "data", ignore_errors=True)
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _require_redis() -> None:
    if shutil.which("redis-server") is None:  # a missing dependency fails the run, it is never skipped
        pytest.fail("redis-server is not installed: hack/install-redis.sh installs it (hack/test.sh runs it)")


@pytest.fixture
def redis_server(tmp_path):
    _require_redis()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server_factory(tmp_path):
    """Makes servers with other options (a password, no append-only file); stops them all after."""
    _require_redis()
    servers = []

    def make(**kw) -> RedisServer:
        s = RedisServer(tmp_path / f"redis-{len(servers)}", **kw)
        servers.append(s)
        s.start()
        return s

    try:
        yield make
    finally:
        for s in servers:
            s.stop()
