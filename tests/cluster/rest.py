"""Plain JSON requests to the API server through the kubernetes client's HTTP layer.

The test kubelet speaks raw JSON (dicts in, dicts out): it needs a handful of
endpoints (pods, bindings, nodes, leases, their status subresources) and exact
control over patches, not the generated typed models.
"""
from __future__ import annotations

import json
from typing import Any, Iterator
from urllib.parse import urlencode

import kubernetes.client


class ApiError(Exception):
    def __init__(self, method: str, path: str, status: int, body: Any):
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


class Rest:
    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api_client = api_client
        self.host = api_client.configuration.host
        token = api_client.configuration.api_key.get("BearerToken")
        self.auth_headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, path: str, *, query: dict | None = None,
                body: Any = None, content_type: str = "application/json",
                timeout: float = 30) -> Any:
        url = self.host + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "Content-Type": content_type,
                   **self.auth_headers}
        response = self.api_client.rest_client.request(
            method, url, headers=headers,
            body=body, _request_timeout=timeout)
        data = response.read()
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = data.decode(errors="replace")
        if response.status >= 400:
            raise ApiError(method, path, response.status, decoded)
        return decoded

    def stream(self, path: str, *, query: dict, timeout: tuple[float, float]) -> Iterator[dict]:
        """The events of a watch request, as they arrive."""
        url = self.host + path + f"?{urlencode(query)}"
        response = self.api_client.rest_client.request(
            "GET", url, headers={"Accept": "application/json", **self.auth_headers},
            _request_timeout=timeout)
        if response.status >= 400:
            data = response.read()
            raise ApiError("GET", path, response.status, json.loads(data) if data else None)
        raw = response.response
        ended = False
        try:
            yield from decode_lines(raw.stream(64 * 1024))
            ended = True
        finally:
            if not ended:  # abandoned mid-stream: the connection has unread data, so it is not reused
                raw.close()
            raw.release_conn()

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body=body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body=body)

    def merge_patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def strategic_patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body=body,
                            content_type="application/strategic-merge-patch+json")

    def delete(self, path: str, body: Any = None) -> Any:
        return self.request("DELETE", path, body=body)


def decode_lines(chunks) -> Iterator[dict]:
    """JSON objects, one per line, from a byte stream that splits lines anywhere."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
    if buffer.strip():
        yield json.loads(buffer)
