"""The ask/tell Study: the one way to drive kubetune's algorithms.

It takes exactly what the Experiment spec takes (parameters, algorithm,
earlyStopping) and is what the engine uses too, so a search behaves the same
from YAML and from Python:

    study = Study(parameters=[{"name": "x", "type": "double", "min": -5, "max": 5}],
                  algorithm={"name": "sobol", "settings": {"seed": 0}}, goal="minimize")
    t = study.ask()
    study.tell(t, (t.params["x"] - 1) ** 2)
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Iterable, Mapping, Sequence

from .api import schema
from .api.spec import DEFAULT_ALGORITHM
from .api.space import SearchSpace
from .api.trial import CONTINUE, Decision, Trial, TrialState, best_of, finite
from .api.validation import Problem, SpecError, check_parameters, check_structure
from .suggestion import SearchExhausted, check_algorithm, make_sampler

class Study:
    def __init__(
        self,
        parameters: Sequence[Mapping[str, Any]],
        algorithm: Mapping[str, Any] | None = None,
        goal: str = "minimize",
        early_stopping: Mapping[str, Any] | None = None,
        prior: Iterable[Trial | Mapping[str, Any]] = (),
        trials: Iterable[Trial] = (),
        seed: int | None = None,
    ):
        """
        prior: finished trials of earlier experiments (Trial objects or
            {"params": ..., "value": ...} mappings), used by model-based samplers
            to warm-start.
        trials: this study's own trials, when rebuilding it after a restart.
        seed: used when the algorithm's settings name none; if neither does,
            one is drawn and kept in `self.seed`.
        """
        algorithm = dict(algorithm or DEFAULT_ALGORITHM)
        parameters = [dict(p) for p in parameters]
        _raise_problems(_check_study(parameters, algorithm, goal, early_stopping))
        settings = dict(algorithm.get("settings") or {})
        given = settings.pop("seed", None)
        if given is None:
            given = seed if seed is not None else secrets.randbelow(2**31)
        self.seed = int(given)
        self.goal = goal
        self.algorithm = algorithm["name"]
        self.space = SearchSpace.from_spec(parameters)
        self.trials: list[Trial] = list(trials)
        self.prior = [_as_trial(p, i) for i, p in enumerate(prior)]
        self.sampler = make_sampler(
            self.algorithm, self.space, seed=self.seed, goal=goal, settings=settings, prior=self.prior
        )
        self.scheduler = None
        if early_stopping:
            from .schedulers import make_scheduler

            self.scheduler = make_scheduler(early_stopping, goal=goal, space=self.space, seed=self.seed)
            # A multi-fidelity model (BOHB's) reads the scheduler's budgets and observations.
            if hasattr(self.sampler, "attach_scheduler"):
                self.sampler.attach_scheduler(self.scheduler)

    # -- ask / report / tell -------------------------------------------------

    def ask(self, new: bool = True) -> Trial | None:
        """What a free worker runs next; raises SearchExhausted.

        Usually a new trial with the sampler's next configuration. With a
        scheduler that pauses trials (promotion ASHA, synchronous HyperBand)
        it may instead be a paused trial to resume from its checkpoint (its
        state goes back to Pending; `trial.budget` says how far to run). With
        new=False only such a resume is returned, else None: for when the
        experiment starts no new configurations but paused ones may go on.
        """
        plan = self.scheduler.on_ask(self.trials, new_allowed=new) if self.scheduler is not None else None
        if plan is not None:
            for n in plan.prune:
                t = self.trials[n]
                if t.state == TrialState.PAUSED:
                    t.state = TrialState.PRUNED
                    t.reason = "not promoted: not in the top of its rung"
                    self.scheduler.on_complete(t, self.trials)
            if plan.resume is not None:
                trial = self.trials[plan.resume]
                trial.state = TrialState.PENDING
                trial.events.append({"event": "resume", "budget": plan.budget, "from_step": trial.last_step})
                return trial
        if not new:
            return None
        params = self.space.canonical(self.sampler.ask(self.trials))
        trial = Trial(number=len(self.trials), params=params)
        if plan is not None and (plan.bracket is not None or plan.budget is not None):
            trial.events.append({"event": "assign", "bracket": plan.bracket, "budget": plan.budget})
        self.trials.append(trial)
        return trial

    def report(self, trial: Trial | int, step: float, value: float, **metrics: float) -> Decision:
        """Records an intermediate objective value; returns what the trial should do next."""
        return self.report_to(self._trial(trial), step, value, metrics)

    def report_to(self, trial: Trial, step: float, value: float, metrics: Mapping[str, float]) -> Decision:
        """report() for one of this study's Trial objects, the other metrics as a mapping: the scheduler
        loop's path, once per report, so it skips the lookup and the keyword arguments."""
        if trial.state == TrialState.PENDING:
            trial.state = TrialState.RUNNING
        v = float(value)
        trial.intermediate.append([step, v])
        if metrics:
            trial.metrics.update({k: float(x) for k, x in metrics.items()})
        # finite(value), a plain float's case first
        if self.scheduler is None or not (value.__class__ is float and math.isfinite(v) or finite(value)):
            return CONTINUE
        decision = self.scheduler.on_report(trial, step, v, self.trials)
        if decision is CONTINUE:
            return decision
        return self._follow(trial, step, decision)

    def released(self) -> list[tuple[Trial, Decision]]:
        """Decisions held back earlier and made now, as (trial, decision), each once.

        With a synchronous scheduler (`pbt`/`pb2` with `synch: true`) `report()` may
        answer `wait`: the decision on that report waits until every other live trial
        has reported the same step (or finished). Call this after reports and `tell()`s
        and hand each decision to its trial, whose report is still the one answered `wait`.
        """
        if self.scheduler is None:
            return []
        out = []
        for number, decision in self.scheduler.released(self.trials):
            trial = self.trials[number]
            out.append((trial, self._follow(trial, trial.last_step, decision)))
        return out

    def resent(self, trial: Trial | int) -> Decision:
        """The decision on the trial's latest report, for a trial that sent it again because it is
        still waiting for the answer (lost with a scheduler or Redis restart). A held decision that a
        rebuilt scheduler no longer holds is made again (and may be held again: `wait`); an exploit
        decided on that report before is handed out again, never drawn twice."""
        trial = self._trial(trial)
        n = len(trial.intermediate)
        if self.scheduler is not None and n and trial.state == TrialState.RUNNING:
            step, value = trial.intermediate[-1]
            decision = self.scheduler.on_resent(trial, step, value, self.trials)
            if decision is not None:
                return self._follow(trial, step, decision)
        exploit = trial.exploit_on_latest
        if exploit is not None:
            return Decision("exploit", f"decided on this report before: continues from trial {exploit['donor']}'s "
                            "checkpoint", donor=exploit["donor"], params=dict(exploit["new"]),
                            donor_step=exploit.get("donor_step"))
        return CONTINUE

    def ended(self, trial: Trial | int) -> bool:
        """The trial's process is gone; its final state is told later (or elsewhere, as in the cluster's
        suggestion service). A synchronous scheduler stops waiting for it; see `released()`. An exploit
        decided on its latest report was never acted on: undone (True; see Trial.undo_unreported_exploit).
        Not done by tell(): a value told in process may come from the donor's model."""
        trial = self._trial(trial)
        if self.scheduler is not None:
            self.scheduler.on_ended(trial)
        return trial.undo_unreported_exploit()

    def _follow(self, trial: Trial, step: float, decision: Decision) -> Decision:
        """Records what the decision does to the trial (its state, an exploit's new parameters)."""
        if decision.stop:
            trial.state = TrialState.PRUNED
            trial.reason = decision.reason
        elif decision.action == "pause":
            trial.state = TrialState.PAUSED
            trial.events.append({"event": "pause", "step": step})
        elif decision.action == "exploit" and decision.params is not None:
            donor = self.trials[decision.donor]
            new = self.space.canonical(decision.params)
            trial.events.append({"event": "exploit", "report": len(trial.intermediate), "step": step,
                                 "donor": donor.number, "donor_report": len(donor.intermediate),
                                 "donor_step": donor.last_step, "donor_params": dict(donor.params),
                                 "old": dict(trial.params), "new": new})
            trial.params = new
        return decision

    def prune_paused(self, reason: str = "experiment ended while it waited for promotion") -> list[Trial]:
        """Marks every paused trial Pruned (when the experiment ends); returns them."""
        out = []
        for t in self.trials:
            if t.state == TrialState.PAUSED:
                self.tell(t, None, state=TrialState.PRUNED, reason=reason)
                out.append(t)
        return out

    def lineage(self, trial: Trial | int | None = None) -> str:
        """How a (PBT) trial's model was trained: which checkpoints and parameters, step by step.
        Defaults to the best trial."""
        from .schedulers.lineage import format_lineage

        trial = self.best_trial if trial is None else self._trial(trial)
        return "" if trial is None else format_lineage(self.trials, trial.number)

    def tell(self, trial: Trial | int, value: float | None = None, state: TrialState | str | None = None,
             reason: str = "") -> Trial:
        """Finishes a trial: with a finite value it succeeds (or stays Pruned), without one it fails."""
        trial = self._trial(trial)
        if state is not None:
            trial.state = TrialState(state)
        elif trial.state != TrialState.PRUNED:
            trial.state = TrialState.SUCCEEDED if finite(value) else TrialState.FAILED
        if value is not None:
            trial.value = float(value)
        if trial.state == TrialState.FAILED and not reason and not trial.reason:
            reason = "no objective value" if value is None else f"objective value is {value}"
        trial.reason = reason or trial.reason
        if self.scheduler is not None:
            self.scheduler.on_complete(trial, self.trials)
        return trial

    # -- what came of it -----------------------------------------------------

    @property
    def best_trial(self) -> Trial | None:
        return best_of(self.trials, self.goal)

    @property
    def best_value(self) -> float | None:
        best = self.best_trial
        return None if best is None else best.value

    def _trial(self, trial: Trial | int) -> Trial:
        number = trial if isinstance(trial, int) else trial.number
        if not 0 <= number < len(self.trials):
            raise KeyError(f"no trial number {number} in this study")
        return self.trials[number]


def prior_from(space: SearchSpace, earlier: Iterable[Trial]) -> list[Trial]:
    """Warm start: the succeeded trials of earlier experiments whose configuration fits `space`."""
    prior: list[Trial] = []
    for t in earlier:
        if t.state == TrialState.SUCCEEDED and finite(t.value):
            params = space.fitting(t.params)
            if params is not None:
                prior.append(Trial(number=len(prior), params=params, value=t.value, state=TrialState.SUCCEEDED))
    return prior


def warm_start_trials(where: str, name: str, earlier: Mapping[str, Any], objective: Mapping[str, Any],
                      trials: Iterable[Trial]) -> tuple[list[Trial], Problem | None]:
    """The trials of earlier experiment `name` (whose spec.objective is `earlier`) with this experiment's
    objective as their value, for prior_from; or a Problem at `where` when they cannot have it.

    The same metric and goal: the trials as they are. The same metric, the other goal: refused (each
    trial's value was picked for the other direction, and the mix-up is almost always a mistake). Another
    metric: each finished trial's latest value of this experiment's metric, if it reported one (trials
    keep the latest value of every metric they report besides the objective); trials without it are left
    out, and refused if none has it."""
    metric, goal = objective["metric"], objective["goal"]
    was_metric, was_goal = earlier.get("metric"), earlier.get("goal")
    if was_metric == metric and was_goal == goal:
        return list(trials), None
    differs = f"experiment {name!r} {_verb(was_goal)} {was_metric}; this one {_verb(goal)} {metric}"
    if was_metric == metric:
        return [], Problem(where, f"{differs} (its trials' values were picked for the other goal); "
                                  "remove it from warmStart or give both the same goal")
    recorded = []
    for t in trials:
        value = t.metrics.get(metric)
        if t.state == TrialState.SUCCEEDED and finite(value):
            recorded.append(Trial(number=t.number, params=dict(t.params), value=float(value), state=t.state))
    if not recorded:
        return [], Problem(where, f"{differs}, and none of its succeeded trials reported {metric!r} "
                                  "(e.g. in objective.additionalMetrics) to use instead; remove it from warmStart")
    return recorded, None


def _verb(goal: Any) -> str:
    return {"minimize": "minimizes", "maximize": "maximizes"}.get(goal, f"has goal {goal!r} for")


def _check_study(parameters, algorithm, goal, early_stopping) -> list[Problem]:
    props = schema.SPEC["properties"]
    problems = check_structure(parameters, props["parameters"], "parameters")
    problems += check_structure(algorithm, props["algorithm"], "algorithm")
    if goal not in schema.GOALS:
        problems.append(Problem("goal", f"must be one of {', '.join(schema.GOALS)}; got {goal!r}"))
    if not problems:
        problems = check_parameters(parameters, "parameters")
    if not problems:
        problems = check_algorithm(algorithm, parameters, "algorithm")
    if not problems and early_stopping:
        problems = check_structure(early_stopping, props["earlyStopping"], "early_stopping")
        if not problems:
            from .schedulers import check_early_stopping

            spec = {"parameters": parameters, "objective": {"goal": goal}, "algorithm": algorithm}
            problems = check_early_stopping(early_stopping, spec, "early_stopping")
    return problems


def _raise_problems(problems: list[Problem]) -> None:
    if problems:
        raise SpecError(problems)


def _as_trial(item: Trial | Mapping[str, Any], number: int) -> Trial:
    if isinstance(item, Trial):
        return item
    value = item.get("value")
    ok = value is not None and math.isfinite(float(value))
    return Trial(
        number=number,
        params=dict(item["params"]),
        value=float(value) if value is not None else None,
        state=TrialState.SUCCEEDED if ok else TrialState.FAILED,
    )


__all__ = ["Study", "SearchExhausted"]
