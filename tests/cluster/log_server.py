"""The kubelet's log endpoint, so that `kubectl logs` works.

The API server proxies GET /api/v1/namespaces/NS/pods/POD/log to
https://<node InternalIP>:<kubeletEndpoint port>/containerLogs/NS/POD/CONTAINER,
authenticating with its kubelet client certificate and checking ours.
"""
from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlparse

from tests.cluster.pki import KeyPair

# find(namespace, pod, container, previous) -> (log file, still running) or None
FindLog = Callable[[str, str, str, bool], "tuple[Path, Callable[[], bool]] | None"]


class LogServer:
    def __init__(self, serving: KeyPair, client_ca: Path, find: FindLog):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(serving.cert), str(serving.key))
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED  # only the API server may read logs
        handler = type("Handler", (_LogHandler,), {"find": staticmethod(find)})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kubelet-logs",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _LogHandler(BaseHTTPRequestHandler):
    find: FindLog

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.send_error(404, "only /containerLogs/NS/POD/CONTAINER is served")
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        found = self.find(parts[1], parts[2], parts[3], query.get("previous") == "true")
        if found is None:
            self.send_error(404, f"no logs for container {parts[3]} of pod {parts[1]}/{parts[2]}")
            return
        path, running = found
        data = path.read_bytes() if path.exists() else b""
        offset = len(data)
        if "tailLines" in query:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(query["tailLines"]):]) if int(query["tailLines"]) else b""
        if "limitBytes" in query:
            data = data[: int(query["limitBytes"])]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if query.get("follow") != "true":
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        # HTTP/1.0 without a length: the body is everything until the connection closes.
        self.end_headers()
        self._follow(path, data, offset, running)

    def _follow(self, path: Path, first: bytes, offset: int,
                running: Callable[[], bool]) -> None:
        """Stream the log until the container has exited and everything is sent."""
        try:
            self.wfile.write(first)
            self.wfile.flush()
            while True:
                alive = running()
                with open(path, "rb") as log:
                    log.seek(offset)
                    data = log.read()
                if data:
                    offset += len(data)
                    self.wfile.write(data)
                    self.wfile.flush()
                elif not alive:
                    break
                else:
                    time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client stopped following
