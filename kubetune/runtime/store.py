"""The local state store: one folder per experiment under the state directory.

    <state-dir>/<experiment>/
        experiment.yaml   the spec as it was run
        state.json        seed, search fingerprint, elapsed time, how it ended
        trials.jsonl      a journal: one full trial record per change, the last one wins
        trials/<name>/    each trial's own folder: output.log, checkpoints
        processes.json    while trials run: their process groups (see orphans.py)

The journal is append-only and flushed to disk after each write, so a crash
(even kill -9) loses at most the record being written, never a finished trial.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Iterable

import yaml

from ..api.trial import Trial

DEFAULT_STATE_DIR = ".kubetune"


class StateError(RuntimeError):
    pass


class StateStore:
    def __init__(self, root: str | Path, name: str):
        self.dir = Path(root) / name
        self.journal = self.dir / "trials.jsonl"
        self.state_file = self.dir / "state.json"
        self.processes_file = self.dir / "processes.json"
        self._handle = None
        self._lock = None

    def lock(self) -> None:
        """Holds the experiment for this process until close(); StateError if another holds it (two runs
        of one experiment would both run its unfinished trials and write one journal). The kernel lets
        go of it when the process ends, even by kill -9."""
        self.dir.mkdir(parents=True, exist_ok=True)
        f = (self.dir / "run.lock").open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise StateError(f"{self.dir} is in use by another `kubetune run` of this experiment"
                             f"{f' (pid {holder})' if holder else ''}; wait for it to end or stop it") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self._lock = f

    @property
    def exists(self) -> bool:
        return self.state_file.exists()

    def trial_dir(self, trial: Trial) -> Path:
        path = self.dir / "trials" / (trial.name or f"{trial.number:04d}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- experiment-level state ------------------------------------------------

    def create(self, document: dict, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "experiment.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        self.save_state(state)

    def load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StateError(f"cannot read {self.state_file}: {e}") from None

    def save_state(self, state: dict) -> None:
        _atomic_write(self.state_file, json.dumps(state, indent=2, sort_keys=True))

    def document(self) -> dict:
        return yaml.safe_load((self.dir / "experiment.yaml").read_text())

    # -- trials ------------------------------------------------------------------

    def load_trials(self) -> list[Trial]:
        """The latest record of every trial, in number order."""
        latest: dict[int, dict] = {}
        if self.journal.exists():
            with self.journal.open() as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a record cut short by a crash; the one before it stands
                    latest[record["number"]] = record
        trials = [Trial.from_dict(latest[n]) for n in sorted(latest)]
        for i, t in enumerate(trials):
            if t.number != i:
                raise StateError(f"{self.journal}: trial numbers are not contiguous (missing {i})")
        return trials

    def save_trials(self, trials: Iterable[Trial]) -> None:
        lines = "".join(json.dumps(t.to_dict(), sort_keys=True) + "\n" for t in trials)
        if not lines:
            return
        if self._handle is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._handle = self.journal.open("a")
            if _cut_short(self.journal):
                lines = "\n" + lines  # ends the record a crash cut short, which stays unreadable on its own line
        self._handle.write(lines)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _cut_short(path: Path) -> bool:
    """Whether the file's last line lacks its newline (a write cut short by kill -9)."""
    with path.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
