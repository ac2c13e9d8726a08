"""Trials die with their runner, even one killed with `kill -9`.

Three layers, each for what the one before cannot reach:

1. The parent-death signal (Linux PR_SET_PDEATHSIG): each trial's process gets SIGTERM (time to save a
   checkpoint) the moment its runner dies. The kernel sends it when the *thread* that forked the trial
   exits, so trials are only ever forked by a thread that lives as long as the process: the main thread,
   or the spawner thread below. It reaches the trial's own process only, not what that process started
   (the command `sh -c "python train.py"`, a DataLoader's workers).
2. The guard: a small process (this file run as a script, in its own session) started with the first
   trial. It holds the read end of a pipe only the runner writes to; when the runner is gone, however it
   went, the read sees the end of file, and the guard terminates the process groups the runner recorded:
   SIGTERM, then SIGKILL after the runner's grace.
3. The record itself (`processes.json` in the experiment's state folder): the next `kubetune run` of the
   experiment, once it holds the experiment's lock (so the run before has ended), terminates what is
   left of the groups recorded there (the guard killed too, say), and says so.

A process is only ever signalled when it is verifiably the run's own: it is in a recorded group, and it
is the group's leader with the start time recorded for it (so a recycled pid is not), or it carries the
run's token in its environment (KUBETUNE_RUN_TOKEN, set in each trial's and inherited by its children),
or the group's recorded leader is still there (a group lives on under its number only while it has
members). Signals go through a pidfd opened before the check, so the pid cannot be reused in between.

Standard library only: the guard runs this file as a script, without importing kubetune.
"""

import ctypes
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

TOKEN_ENV = "KUBETUNE_RUN_TOKEN"
SETTLE = 5.0  # seconds a SIGKILLed process gets to be gone before it is reported still there
_PR_SET_PDEATHSIG = 1
PARENT_DEATH_SIGNAL = signal.SIGTERM  # a trainer may save a checkpoint; the guard's SIGKILL follows


# -- 1. the parent-death signal --------------------------------------------------------------------------


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()  # resolved here: the child between fork and exec should do as little as it can


def _parent_death(sig: int, parent: int):
    """The preexec_fn that asks for `sig` when the forking thread ends."""
    def preexec() -> None:
        if _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            return  # (refused, a seccomp filter say): the guard and the next run still stand
        if os.getppid() != parent:
            os._exit(1)  # the runner died between fork and prctl: the signal will never come
    return preexec


class _Spawner:
    """A thread that forks for threads that may end before their children (see the module's doc). It
    waits on its queue until the process ends: it is never joined and never returns."""

    def __init__(self):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="kubetune-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            future, args, kwargs = self._calls.get()
            try:
                future.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        future: Future = Future()
        self._calls.put((future, args, kwargs))
        return future.result()


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _forget_spawner() -> None:
    global _spawner
    _spawner = None  # a forked child has no such thread


os.register_at_fork(after_in_child=_forget_spawner)


def popen_dying_with_us(*args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen, the child set to get PARENT_DEATH_SIGNAL when this process dies (on Linux)."""
    global _spawner
    if _prctl is None:
        return subprocess.Popen(*args, **kwargs)
    kwargs["preexec_fn"] = _parent_death(PARENT_DEATH_SIGNAL, os.getpid())
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(*args, **kwargs)  # (the main thread ends with the process)
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
        spawner = _spawner
    return spawner.popen(*args, **kwargs)


# -- the record --------------------------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks since boot) of a process, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rsplit(b")", 1)[1].split()
    return fields[0].decode(), int(fields[2]), int(fields[19])


def start_time(pid: int) -> int | None:
    st = _stat(pid)
    return st[2] if st else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


_busy_guards: list[subprocess.Popen] = []


class ProcessBook:
    """The process groups of this run's live trials, kept in `path` as they start and end, and the guard
    that terminates them if the run dies with them still running."""

    def __init__(self, path: Path, kill_after: float):
        self.path = Path(path)
        self.kill_after = kill_after
        self.token = secrets.token_hex(16)
        self.groups: dict[int, dict] = {}
        self._guard: subprocess.Popen | None = None
        self._pipe: int | None = None
        self.enabled = Path("/proc/self/stat").exists()  # (start times and group members come from /proc)

    def add(self, trial: int, pid: int) -> None:
        if not self.enabled:
            return
        start = start_time(pid)
        if start is None:
            return  # gone already (its group with it: it led it)
        if self._guard is None:
            self._start_guard()
        self.groups[pid] = {"trial": trial, "start": start}
        self._save()

    def remove(self, pid: int) -> None:
        if self.groups.pop(pid, None) is not None:
            self._save()

    def close(self) -> None:
        """At the run's end: what is still recorded (trials that outlasted close()) is the guard's now."""
        if not self.groups and self._guard is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        if self._pipe is not None:
            os.close(self._pipe)  # the guard's end of file
            self._pipe = None
        if self._guard is not None:
            if not self.groups:
                try:
                    self._guard.wait(2)  # it ends at once, with nothing to do
                except subprocess.TimeoutExpired:
                    _busy_guards.append(self._guard)
            else:
                _busy_guards.append(self._guard)  # terminating what outlasted the run: not waited for
            self._guard = None

    def _save(self) -> None:
        record = {"token": self.token, "boot": _boot_id(), "runner": os.getpid(),
                  "guard": self._guard.pid if self._guard else None,
                  "groups": {str(pgid): g for pgid, g in self.groups.items()}}
        _atomic_write(self.path, json.dumps(record, indent=1, sort_keys=True))

    def _start_guard(self) -> None:
        read, write = os.pipe()  # (both ends close on exec: no trial holds the write end)
        try:
            self._guard = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), "guard", str(self.path), self.token,
                 str(self.kill_after)],
                stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                start_new_session=True,  # a kill of the runner's group (Ctrl-\, kill -9 -PGID) is not the guard's
            )
        except OSError:
            os.close(write)
            self._guard = None
            return
        finally:
            os.close(read)
        self._pipe = write


# -- 2, 3. terminating what is left --------------------------------------------------------------------------


def _has_token(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{TOKEN_ENV}={token}".encode() in f.read().split(b"\0")
    except OSError:
        return False  # (another user's: not verifiably ours)


def _ours(groups: dict[int, int], token: str) -> list[tuple[int, int | None]]:
    """(pid, pidfd) of every live process verifiably of the recorded groups ({pgid: leader's start})."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        st = _stat(pid)
        if st is None or st[0] in "ZX" or st[1] not in groups:
            continue
        try:
            fd = os.pidfd_open(pid)  # the process itself from here on, whatever becomes of its pid
        except ProcessLookupError:
            continue
        except OSError:
            fd = None  # (a kernel before 5.3): a signal by pid, right after the checks
        st = _stat(pid)  # again, now that the pidfd holds it
        pgid = st[1] if st else None
        if st is None or st[0] in "ZX" or pgid not in groups:
            ok = False
        elif pid == pgid:
            ok = st[2] == groups[pgid]
        else:
            leader = _stat(pgid)
            ok = _has_token(pid, token) or (leader is not None and leader[1] == pgid and leader[2] == groups[pgid])
        if ok:
            found.append((pid, fd))
        elif fd is not None:
            os.close(fd)
    return found


def _send(pid: int, fd: int | None, sig: int) -> None:
    try:
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    finally:
        if fd is not None:
            os.close(fd)


def live_leftovers(record: dict | None) -> list[int]:
    """The pids of the record's processes that are still there and verifiably its run's."""
    groups = _groups(record)
    if not groups:
        return []
    found = _ours(groups, record.get("token", ""))
    for _, fd in found:
        if fd is not None:
            os.close(fd)
    return sorted(pid for pid, _ in found)


def _groups(record: dict | None) -> dict[int, int]:
    if not record or not Path("/proc/self/stat").exists() or record.get("boot") != _boot_id():
        return {}  # (a record from before a reboot: nothing of it can be running)
    try:
        return {int(pgid): int(g["start"]) for pgid, g in record.get("groups", {}).items()}
    except (TypeError, ValueError, KeyError, AttributeError):
        return {}


def terminate(record: dict | None, grace: float, poll: float = 0.05) -> list[int]:
    """SIGTERM to the record's processes (and to any that appear in its groups), SIGKILL to those still
    there after `grace` seconds; the pids still there SETTLE seconds after that."""
    groups = _groups(record)
    if not groups:
        return []
    token = record.get("token", "")
    termed: set[tuple[int, int]] = set()
    kill_at = time.monotonic() + grace
    give_up = kill_at + SETTLE
    while True:
        now = time.monotonic()
        found = _ours(groups, token)
        if not found or now >= give_up:
            for _, fd in found:
                if fd is not None:
                    os.close(fd)
            return sorted(pid for pid, _ in found)
        for pid, fd in found:
            st = _stat(pid)
            key = (pid, st[2] if st else 0)
            if now >= kill_at:
                _send(pid, fd, signal.SIGKILL)
            elif key not in termed:
                termed.add(key)
                _send(pid, fd, signal.SIGTERM)
            elif fd is not None:
                os.close(fd)
        time.sleep(poll)


def clean_up(path: Path, grace: float, say) -> None:
    """Before a run starts (holding the experiment's lock): terminates what the run before left of its
    trials, telling `say` about it; then forgets the record."""
    record = read_record(path)
    left = live_leftovers(record)
    if left:
        shown = " ".join(map(str, left[:10])) + (" ..." if len(left) > 10 else "")
        say(f"kubetune: an earlier run of this experiment (pid {record.get('runner')}) ended without "
            f"stopping its trials; terminating {len(left)} of their processes that are still running "
            f"(pid {shown}): SIGTERM, SIGKILL after {grace:g}s")
        still = terminate(record, grace)
        if still:
            say(f"kubetune: still there after SIGKILL (pid {' '.join(map(str, still))}); going on")
        else:
            say("kubetune: they are gone")
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass


def _guard(path: str, token: str, grace: str) -> None:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        while os.read(0, 4096):
            pass  # (nobody writes: the end of file is the runner gone)
    except OSError:
        pass
    record = read_record(Path(path))
    if record is None or record.get("token") != token:
        return  # ended cleanly (the record removed), or a later run's record
    terminate(record, float(grace))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "guard":
    _guard(*sys.argv[2:])
