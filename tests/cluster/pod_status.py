"""A pod's containers run by the test kubelet, and the status it reports for it."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

TERMINAL_PHASES = ("Succeeded", "Failed")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ContainerRun:
    """The local process behind one of a pod's containers, and its state."""
    namespace: str
    pod: str
    uid: str
    container: str
    image: str
    workdir: Path
    sidecar: bool = False  # a native sidecar: an init container with restartPolicy Always
    restart_count: int = 0
    attempted: bool = False  # a start was tried (restarts count from there)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    previous_log_path: Path | None = None
    started_at: str = ""
    finished_at: str = ""
    exit_code: int | None = None
    last_terminated: dict | None = None
    termination_log: Path | None = None  # the file its terminationMessagePath stands for
    waiting: tuple[str, str] | None = None  # (reason, message)
    restart_at: float = 0.0
    terminal: bool = False  # exited, never to be restarted
    kill_at: float | None = None  # when told to stop: SIGKILL from then on

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class PodRun:
    """A pod's containers run by the test kubelet (native sidecars first, as a kubelet starts them,
    then the regular ones, in spec order), and what was last reported for it."""
    namespace: str
    pod: str
    uid: str
    containers: list[ContainerRun]
    reported: dict | None = None
    start_time: str = field(default_factory=now)

    @property
    def regular(self) -> list[ContainerRun]:
        return [c for c in self.containers if not c.sidecar]

    @property
    def terminal(self) -> bool:
        """Over for good: every container exited and none will restart (native sidecars included)."""
        return all(c.terminal for c in self.containers)

    def running(self) -> bool:
        return any(c.running() for c in self.containers)

    def processes(self) -> list[subprocess.Popen]:
        return [c.process for c in self.containers if c.process is not None]

    def container(self, name: str) -> ContainerRun | None:
        return next((c for c in self.containers if c.container == name), None)


def container_status(run: ContainerRun) -> dict:
    status = {"name": run.container, "image": run.image, "imageID": "",
              "restartCount": run.restart_count, "ready": False, "started": False}
    if run.process is not None:
        status["containerID"] = f"local-process://{run.process.pid}"
    if run.waiting:
        status["state"] = {"waiting": {"reason": run.waiting[0], "message": run.waiting[1]}}
    elif run.running():
        status["state"] = {"running": {"startedAt": run.started_at}}
        status["ready"] = status["started"] = True
    elif run.exit_code is not None:
        status["state"] = {"terminated": dict(run.last_terminated,
                                              containerID=status.get("containerID", ""))}
    else:
        status["state"] = {"waiting": {"reason": "ContainerCreating"}}
    if run.last_terminated and (run.waiting or run.running()) and run.restart_count:
        status["lastState"] = {"terminated": run.last_terminated}
    return status


def pod_status(run: PodRun) -> dict:
    """The pod's status as a kubelet reports it (transition times are added on change): Succeeded
    once every container has exited 0 for good, Failed once every one has exited and one failed
    (native sidecars' exits do not count), Running while any runs or has run, else Pending."""
    regular = run.regular
    if run.terminal:
        phase = "Succeeded" if all(c.exit_code == 0 for c in regular) else "Failed"
    elif any(c.running() or c.restart_count or c.exit_code is not None
             or (c.waiting and c.waiting[0] == "CrashLoopBackOff") for c in run.containers):
        phase = "Running"
    else:
        phase = "Pending"
    ready = "True" if regular and all(c.running() for c in regular) else "False"
    conditions = [{"type": t, "status": s} for t, s in (
        ("PodReadyToStartContainers", "True"), ("Initialized", "True"),
        ("ContainersReady", ready), ("Ready", ready), ("PodScheduled", "True"))]
    status = {"phase": phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
              "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
              "startTime": run.start_time, "conditions": conditions,
              "containerStatuses": [container_status(c) for c in regular]}
    sidecars = [container_status(c) for c in run.containers if c.sidecar]
    if sidecars:
        status["initContainerStatuses"] = sidecars
    return status


def with_transition_times(status: dict, previous: dict | None) -> dict:
    """status, its conditions that changed since previous stamped with the time now."""
    def changed(condition: dict) -> bool:
        return not previous or not any(
            c["type"] == condition["type"] and c["status"] == condition["status"]
            for c in previous["conditions"])
    return dict(status, conditions=[dict(c, lastTransitionTime=now()) if changed(c) else c
                                    for c in status["conditions"]])
