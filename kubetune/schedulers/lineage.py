"""The lineage of a PBT trial: which trials' checkpoints and parameters it descends from.

Each exploit is in the exploiting trial's events: {"event": "exploit",
"report": index into its intermediate values, "step", "donor", "donor_report",
"donor_step", "old", "new"}. Following donors back gives the schedule of
parameters the final model was trained with.
"""

from __future__ import annotations

from typing import Sequence

from ..api.trial import Trial


def exploits(trial: Trial) -> list[dict]:
    return [e for e in trial.events if e.get("event") == "exploit"]


def lineage(trials: Sequence[Trial], number: int, upto: int | None = None) -> list[dict]:
    """Segments oldest first: {"trial", "params", "from_step", "to_step", "donor"} of the
    training that trial `number` (up to its report index `upto`) continues."""
    t = trials[number]
    upto = len(t.intermediate) if upto is None else upto
    mine = [e for e in exploits(t) if e["report"] <= upto]
    if not mine:
        params = exploits(t)[0]["old"] if exploits(t) else t.params
        return [_segment(t, params, 0, upto, None)]
    e = mine[-1]
    before = lineage(trials, e["donor"], e.get("donor_report"))
    return before + [_segment(t, e["new"], e["report"], upto, e["donor"])]


def _segment(t: Trial, params: dict, start: int, end: int, donor: int | None) -> dict:
    steps = [s for s, _ in t.intermediate[start:end]]
    return {"trial": t.number, "params": dict(params), "from_step": steps[0] if steps else None,
            "to_step": steps[-1] if steps else None, "donor": donor,
            "value": t.intermediate[end - 1][1] if steps else None}


def format_lineage(trials: Sequence[Trial], number: int) -> str:
    """One line per segment, e.g. for printing the best trial's schedule."""
    lines = []
    for seg in lineage(trials, number):
        how = f"from trial {seg['donor']}'s checkpoint, " if seg["donor"] is not None else ""
        span = "no reports" if seg["from_step"] is None else f"steps {seg['from_step']:g}-{seg['to_step']:g}"
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in seg["params"].items())
        value = "" if seg["value"] is None else f" -> {seg['value']:.4g}"
        lines.append(f"trial {seg['trial']}: {how}{span} with {params}{value}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
