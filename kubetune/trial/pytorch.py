"""PyTorch helpers: a model and its optimizer in one checkpoint.

    from kubetune.trial import pytorch as ckpt
    start = ckpt.restore(model, optimizer)           # resume after a pause: the step to go on from
    ...
    ckpt.save(model, optimizer, step=epoch)
    d = trial.report(step=epoch, val_accuracy=acc)
    if d.action == "exploit":                        # PBT: take the donor's weights, then its new params
        ckpt.restore(model, optimizer, donor=d)     # its checkpoint from the step it was judged at
"""

from __future__ import annotations

import io

import torch

from ..api.trial import Decision
from . import checkpoint


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, step: float | None = None,
         **extra) -> None:
    state = {"model": model.state_dict(), "step": step, "extra": extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    checkpoint.save_bytes(buf.getvalue(), step)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
            donor: "int | Decision | None" = None, map_location="cpu") -> float | None:
    """Loads this trial's checkpoint, or first copies (and verifies) the donor's; returns its step.

    donor: the exploit decision (its donor's checkpoint from the step it was judged at), or a
    donor trial's number (its latest checkpoint)."""
    if donor is not None:
        checkpoint.copy_from(donor if isinstance(donor, Decision) else checkpoint.donor_name(donor))
    got = checkpoint.load_bytes()
    if got is None:
        return None
    state = torch.load(io.BytesIO(got[0]), map_location=map_location, weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    return state.get("step")
