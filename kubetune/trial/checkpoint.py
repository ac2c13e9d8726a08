"""Checkpoints: what lets a paused trial resume and a PBT trial take a better one's weights.

Each trial writes under $KUBETUNE_CHECKPOINT_DIR/<trial-name>/ (a folder of
the local state directory, or a shared volume in a cluster). A save writes the
data to a temporary file, fsyncs it and renames it into place, then records
its SHA-256 in `latest.json` the same way, so a reader never sees half a
checkpoint. Taking another trial's checkpoint copies it into this trial's
folder and checks the digest before anything is loaded. `latest.json` also
lists the few newest checkpoints with their steps: a PBT exploit takes the
donor's checkpoint from the step it was judged at, even when the donor has
saved a newer one since.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

from ..api.trial import Decision

LATEST = "latest.json"
KEEP = 3  # checkpoint files kept per trial: the latest, and older ones a reader may still be opening
READ_ATTEMPTS = 5


class CheckpointError(RuntimeError):
    pass


def root() -> Path:
    base = os.environ.get("KUBETUNE_CHECKPOINT_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("KUBETUNE_TRIAL_DIR", ".")) / "checkpoints"


def trial_folder(name: str | None = None) -> Path:
    name = name or os.environ.get("KUBETUNE_TRIAL_NAME", "trial")
    return root() / name


def donor_name(number: int) -> str:
    """The folder name of trial `number` of this experiment."""
    return f"{os.environ.get('KUBETUNE_EXPERIMENT', 'experiment')}-{int(number):04d}"


def save_bytes(data: bytes, step: float | None = None) -> Path:
    """Writes this trial's checkpoint atomically; returns its path."""
    folder = trial_folder()
    folder.mkdir(parents=True, exist_ok=True)
    # A new file each time, so a donor being read by another trial is never overwritten under it.
    path = folder / f"checkpoint-{time.time_ns()}.bin"
    _atomic_write(path, data)
    meta = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "step": step,
            "attempt": _attempt()}
    recent = [m for m in _read_latest(folder).get("recent", []) if m.get("attempt", 1) == meta["attempt"]]
    # The one saved at the step this trial was paused at stays, however long a trainer that ignores the
    # pause goes on saving: its resumed run starts from it (KUBETUNE_RESUME_STEP).
    held = [m for m in recent if _held_step is not None and m.get("step") == _held_step][-1:]
    recent = [m for i, m in enumerate(recent) if m in held or i >= len(recent) - (KEEP - 1)]  # (in order)
    _atomic_write(folder / LATEST, json.dumps({**meta, "recent": recent + [meta]}).encode())
    kept = {m["file"] for m in held}
    for old in sorted(folder.glob("checkpoint-*.bin"))[:-KEEP]:
        if old.name not in kept:
            old.unlink(missing_ok=True)
    global _saved_here
    _saved_here = True
    return path


# Set by this process: whether it has saved a checkpoint (then its own latest is what it resumes from), and
# the step the scheduler paused it at (kubetune.trial.report).
_saved_here = False
_held_step: float | None = None


def hold(step: float | None) -> None:
    """Keeps the checkpoint saved at `step`, the report this trial was paused at, from being rotated out."""
    global _held_step
    _held_step = step


def _resume_step() -> float | None:
    """The step a resumed run of a paused trial goes on from: its checkpoint from that step, not a later one
    that a trainer which ignored the pause saved. Only until this run saves its own."""
    raw = os.environ.get("KUBETUNE_RESUME_STEP")
    return None if _saved_here or not raw else float(raw)


def _attempt() -> int:
    """This run's attempt: a trial whose pod (or process) was lost runs again from the start as the next."""
    return int(os.environ.get("KUBETUNE_ATTEMPT") or 1)


def _read_latest(folder: Path) -> dict:
    try:
        return json.loads((folder / LATEST).read_bytes())
    except FileNotFoundError:
        return {}


def _at_step(latest: dict, step: float | None) -> dict:
    """The newest kept checkpoint saved at or before `step`; when all kept ones are newer, the oldest
    of them (the nearest); the latest when steps are not recorded."""
    recent = [m for m in latest.get("recent", []) if m.get("step") is not None]
    if step is None or not recent:
        return latest
    fits = [m for m in recent if m["step"] <= step]
    return fits[-1] if fits else recent[0]


def load_bytes(name: str | None = None, step: float | None = None) -> tuple[bytes, dict] | None:
    """The latest checkpoint of this trial (or of trial `name`), verified; None if it has none.
    With `step`: the newest one saved at or before that step, if it is still kept. A resumed run of a
    paused trial gets, until it saves its own, the one from the step it was paused at.

    This trial's own checkpoint from an earlier attempt is not one: that attempt's reports were dropped
    and the trial runs again from the start, so resuming the lost run's model would leave its record
    without the steps before. (A paused trial resumed is the same attempt, and takes its checkpoint.)"""
    folder = trial_folder(name)
    resume = _resume_step() if name is None and step is None else None
    for tries in range(READ_ATTEMPTS):
        latest = _read_latest(folder)
        if not latest or (name is None and latest.get("attempt", 1) < _attempt()):
            return None
        at = step
        if resume is not None and any(m.get("step") == resume for m in latest.get("recent", [])):
            # The one saved at the step it was paused at (held). None saved at it: its checkpoints count steps
            # otherwise than its reports (global steps, epochs), and the latest is the one, as before.
            at = resume
        meta = {k: v for k, v in _at_step(latest, at).items() if k != "recent"}
        try:
            data = (folder / meta["file"]).read_bytes()
        except FileNotFoundError:
            continue  # its owner moved on to a newer checkpoint between our two reads
        if hashlib.sha256(data).hexdigest() == meta["sha256"]:
            return data, meta
        time.sleep(0.01 * (tries + 1))
    raise CheckpointError(f"checkpoint of {folder.name} does not match its digest")


def copy_from(donor: "str | Decision", step: float | None = None) -> dict:
    """Copies the donor trial's checkpoint into this trial's folder, verified; returns its metadata.

    donor: the donor trial's folder name (`donor_name(number)`), or the exploit decision itself,
    which names the donor and the step it was judged at. From that step (or `step`) when that
    checkpoint is still kept, else the donor's latest."""
    if isinstance(donor, Decision):
        donor, step = donor_name(donor.donor), donor.donor_step if step is None else step
    got = load_bytes(donor, step)
    if got is None:
        raise CheckpointError(f"trial {donor} has no checkpoint to copy")
    data, meta = got
    save_bytes(data, meta.get("step"))
    if load_bytes() is None:
        raise CheckpointError("the copied checkpoint could not be read back")
    return {**meta, "donor": donor}


def save(state: Any, step: float | None = None) -> Path:
    """Saves any picklable state (for PyTorch, see kubetune.trial.torch)."""
    return save_bytes(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), step)


def load(name: str | None = None) -> Any | None:
    got = load_bytes(name)
    return None if got is None else pickle.loads(got[0])


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


__all__ = ["CheckpointError", "copy_from", "donor_name", "load", "load_bytes", "save", "save_bytes",
           "trial_folder"]
