"""The test kubelet's view of its pods: one list, then a watch, as a real kubelet keeps it.

Listing every pod of the node on each sync pass costs the API server and the
kubelet O(pods) per pass, and finished pods stay in the API: after a thousand
trials each pass moved megabytes of JSON. A watch costs per change instead.
"""
from __future__ import annotations

import threading

from tests.cluster.rest import ApiError, Rest

WATCH_SECONDS = 60  # the server ends each watch after this long; it is then resumed from the last version


class PodWatch:
    def __init__(self, api: Rest, field_selector: str):
        self.api = api
        self.field_selector = field_selector
        self._pods: dict[str, dict] = {}  # uid -> the newest pod object seen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._version = ""
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def start(self, name: str) -> "PodWatch":
        self._relist()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The thread ends with its current watch (at the next event, or when the server ends it)."""
        self._stop.set()

    def pods(self) -> list[dict]:
        with self._lock:
            return list(self._pods.values())

    def assume(self, pod: dict) -> None:
        """A pod this node just bound, counted before its watch event arrives (as a scheduler assumes)."""
        with self._lock:
            self._pods.setdefault(pod["metadata"]["uid"], pod)

    def _relist(self) -> None:
        listed = self.api.get("/api/v1/pods", fieldSelector=self.field_selector)
        with self._lock:
            self._pods = {p["metadata"]["uid"]: p for p in listed["items"]}
            self._version = listed["metadata"]["resourceVersion"]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch_once()
            except ApiError as error:
                if error.status == 410:  # too old to resume: start again from a fresh list
                    self._relist_quietly()
                else:
                    self._failed(error)
            except Exception as error:  # noqa: BLE001 - the API server restarting, a dropped connection
                self._failed(error)

    def _failed(self, error: Exception) -> None:
        self.errors.append(f"{type(error).__name__}: {error}")
        self._stop.wait(0.2)
        self._relist_quietly()

    def _relist_quietly(self) -> None:
        try:
            self._relist()
        except Exception as error:  # noqa: BLE001 - retried by the loop
            self.errors.append(f"relist: {type(error).__name__}: {error}")

    def _watch_once(self) -> None:
        query = {"fieldSelector": self.field_selector, "watch": "true", "resourceVersion": self._version,
                 "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_SECONDS)}
        for event in self.api.stream("/api/v1/pods", query=query, timeout=(10, WATCH_SECONDS + 30)):
            if self._stop.is_set():
                return
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                raise ApiError("WATCH", "/api/v1/pods", obj.get("code", 500), obj)
            with self._lock:
                self._version = obj["metadata"].get("resourceVersion", self._version)
                if kind == "DELETED":
                    self._pods.pop(obj["metadata"]["uid"], None)
                elif kind in ("ADDED", "MODIFIED"):
                    self._pods[obj["metadata"]["uid"]] = obj

