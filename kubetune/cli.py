"""The `kubetune` command.

    kubetune run FILE [--json]      run (or resume) an experiment on this machine
                 [--redis URL]      trials report over Redis Streams, as in a cluster
    kubetune validate FILE          check a spec; exit 2 listing every problem
    kubetune results NAME|FILE      the trials of a finished or interrupted run

Exit codes: 0 done, 1 the experiment failed (maxFailedTrials), 2 bad spec or
usage, 130 interrupted (run again to resume).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

from .api.durations import format_duration
from .api.spec import ExperimentSpec, load_spec
from .api.trial import Trial, TrialState, best_of
from .api.validation import Problem, SpecError, suggestion
from .runtime.bridge import BusUnreachable
from .runtime.runner import RunResult, run_experiment
from .runtime.store import DEFAULT_STATE_DIR, StateError, StateStore

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
STATES = [s for s in TrialState]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except (StateError, BusUnreachable, FileNotFoundError, IsADirectoryError) as e:
        print(f"kubetune: {e}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune", description="Hyperparameter optimisation, on a cluster or on one machine.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                       help=f"where experiments keep their results (default: {DEFAULT_STATE_DIR})")

    run = sub.add_parser("run", parents=[state], help="run or resume an experiment on this machine")
    run.add_argument("file", help="an Experiment YAML file")
    run.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    run.add_argument("--quiet", action="store_true", help="no live progress")
    run.add_argument("--redis", metavar="URL",
                     help="trials report over the Redis Streams metric bus at URL (redis:// or rediss:// for "
                          "TLS), as pods do, instead of the local socket")
    run.add_argument("--redis-password-env", metavar="NAME",
                     help="the environment variable that holds the Redis password (trials get it too)")
    run.add_argument("--redis-ca", metavar="FILE",
                     help="with a rediss:// URL: the CA certificate that signed the server's (trials get it too)")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check an Experiment file; exit 2 listing every problem")
    val.add_argument("file")
    val.set_defaults(func=cmd_validate)

    res = sub.add_parser("results", parents=[state], help="show the trials of a finished or interrupted run")
    res.add_argument("experiment", help="an experiment name, or its YAML file")
    res.add_argument("--json", action="store_true")
    res.add_argument("--all", action="store_true", help="every trial, not only the best ten")
    res.set_defaults(func=cmd_results)

    st = sub.add_parser("settings", help="list the algorithms and early-stopping methods with their settings")
    st.add_argument("name", nargs="?", help="only this algorithm or early-stopping method")
    st.set_defaults(func=cmd_settings)
    return p


def cmd_validate(args) -> int:
    spec = load_spec(args.file)
    print(f"{args.file}: valid Experiment {spec.name!r} ({len(spec.parameters)} parameters, "
          f"algorithm {spec.algorithm['name']}, up to {spec.budget.max_trials} trials)")
    return 0


def cmd_run(args) -> int:
    spec = load_spec(args.file)
    password = None
    for flag, given in (("--redis-password-env", args.redis_password_env), ("--redis-ca", args.redis_ca)):
        if given and not args.redis:
            raise SpecError([Problem(flag, "only with --redis")])
    if args.redis_ca and not Path(args.redis_ca).is_file():
        raise SpecError([Problem("--redis-ca", f"no such file: {args.redis_ca}")])
    if args.redis_password_env:
        password = os.environ.get(args.redis_password_env)
        if not password:
            raise SpecError([Problem("--redis-password-env", f"${args.redis_password_env} is not set")])
    out = sys.stderr if args.json else sys.stdout
    progress = None if args.quiet else _Progress(out)
    # Ctrl-C, `kill` and a hangup stop the run cleanly, at the runner's next pass (see run_experiment).
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # A closed terminal or SSH session too: killed by it, the run would leave its trials running on
    # (unless it is ignored, as under nohup: the run is meant to go on).
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda *_: stop.set())
    try:
        result = run_experiment(spec, args.state_dir, base_dir=Path(args.file).resolve().parent,
                                on_progress=progress, stop=stop, redis_url=args.redis, redis_password=password,
                                redis_ca=args.redis_ca)
    except KeyboardInterrupt:
        if progress:
            progress.end()
        print(f"interrupted: results so far are in {Path(args.state_dir) / spec.name}; "
              f"run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if progress:
        progress.end()
    return _finish(result, args.json, out, show_all=False)


def cmd_settings(args) -> int:
    """What `algorithm.settings` and `earlyStopping.settings` accept, from the classes themselves."""
    from .schedulers import SCHEDULERS
    from .suggestion import SAMPLERS

    kinds = [("algorithm", SAMPLERS), ("earlyStopping", SCHEDULERS)]
    if args.name is not None and not any(args.name in table for _, table in kinds):
        known = sorted({n for _, table in kinds for n in table})
        raise SpecError([Problem("name", f"unknown algorithm or early-stopping method {args.name!r}; "
                                         f"{suggestion(args.name, known)} (known: {', '.join(known)})")])
    for field, table in kinds:
        for name, cls in table.items():
            if args.name not in (None, name):
                continue
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
            summary = doc.splitlines()[0] if doc else ""
            print(f"{field}.name: {name}" + (f"  -- {summary}" if summary else ""))
            settings = getattr(cls, "SETTINGS", {})
            width = max((len(k) for k in settings), default=0)
            for key, s in settings.items():
                default = "(none)" if s.default is None else json.dumps(s.default)
                choices = f" (one of {', '.join(map(str, s.choices))})" if s.choices else ""
                print(f"  {key:<{width}}  {s.type.__name__:<5}  default {default:<8}  {s.help}{choices}")
            print()
    return 0


def cmd_results(args) -> int:
    name = args.experiment
    if name.endswith((".yaml", ".yml")) and Path(name).exists():
        name = load_spec(name).name
    store = StateStore(args.state_dir, name)
    if not store.exists:
        raise StateError(f"no experiment {name!r} under {args.state_dir}")
    spec = ExperimentSpec.from_document(store.document())
    state = store.load_state()
    from .engine import Completion

    completion = Completion(**state["completion"]) if state.get("completion") else None
    result = RunResult(spec, store.load_trials(), completion, state.get("elapsed", 0.0), store.dir)
    return _finish(result, args.json, sys.stderr if args.json else sys.stdout, show_all=args.all)


# ---------------------------------------------------------------- output


def summary(result: RunResult) -> dict:
    best = best_trial(result.spec, result.trials)
    counts = {s.value: sum(t.state == s for t in result.trials) for s in STATES}
    c = result.completion
    return {
        "experiment": result.spec.name,
        "status": "Running" if c is None else ("Succeeded" if c.succeeded else
                                               "Interrupted" if c.reason == "Interrupted" else "Failed"),
        "reason": c.reason if c else None,
        "message": c.message if c else None,
        "objective": {"metric": result.spec.objective.metric, "goal": result.spec.objective.goal},
        "trials": len(result.trials),
        "counts": counts,
        "best": None if best is None else {
            "trial": best.name, "number": best.number, "value": best.value, "params": best.params,
            "metrics": best.metrics,
        },
        "elapsed_seconds": round(result.elapsed, 3),
        "state_dir": str(result.state_dir),
    }


def best_trial(spec: ExperimentSpec, trials: list[Trial]) -> Trial | None:
    return best_of(trials, spec.objective.goal)


def _finish(result: RunResult, as_json: bool, out, show_all: bool) -> int:
    info = summary(result)
    print(_table(result, show_all), file=out)
    best = best_trial(result.spec, result.trials)
    if best is not None and any(e.get("event") == "exploit" for t in result.trials for e in t.events):
        from .schedulers.lineage import format_lineage, lineage

        print(f"lineage of the best trial ({best.name}):", file=out)
        print(format_lineage(result.trials, best.number), file=out)
        info["lineage"] = lineage(result.trials, best.number)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    failed = result.completion is not None and not result.completion.succeeded \
        and result.completion.reason != "Interrupted"
    return EXIT_FAILED if failed else 0


def _table(result: RunResult, show_all: bool) -> str:
    spec = result.spec
    c = result.completion
    counts = ", ".join(f"{n} {s.value.lower()}" for s in STATES if (n := sum(t.state == s for t in result.trials)))
    lines = [f"experiment {spec.name}: {c.reason + ' - ' + c.message if c else 'not finished'}",
             f"trials: {len(result.trials)} ({counts or 'none'}), elapsed {format_duration(result.elapsed)}"]
    finished = [t for t in result.trials if t.value is not None and math.isfinite(t.value)]
    ranked = sorted(finished, key=lambda t: (t.state != TrialState.SUCCEEDED, spec.objective.sign * t.value, t.number))
    others = [t for t in result.trials if t not in finished]
    rows = ranked + others if show_all else ranked[:10]
    if not rows:
        return "\n".join(lines + ["no trial has an objective value yet"])
    names = sorted({k for t in rows for k in t.params}, key=lambda k: [p["name"] for p in spec.parameters].index(k))
    header = ["rank", "trial", "state", spec.objective.metric] + names
    body = []
    for i, t in enumerate(rows, 1):
        value = "-" if t.value is None else f"{t.value:.6g}"
        body.append([str(i) if t in ranked else "-", t.name or str(t.number), t.state.value, value]
                    + [_fmt(t.params.get(k, "")) for k in names])
    widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]
    fmt = lambda r: "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()  # noqa: E731
    title = f"best trials by {spec.objective.metric} ({spec.objective.goal}):" if not show_all else "trials:"
    return "\n".join(lines + [title, fmt(header)] + [fmt(r) for r in body])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class _Progress:
    """One live line: trials done / running / failed, best so far, elapsed."""

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.last = ""
        self.width = 0

    def __call__(self, engine, now: float) -> None:
        n = lambda *s: engine.count(*s)  # noqa: E731
        best = engine.study.best_trial
        best_txt = f"best {engine.objective.metric}={best.value:.6g} (trial {best.number})" if best else "no result yet"
        line = (f"[{format_duration(engine.elapsed(now))}] trials {len(engine.trials)}/{engine.budget.max_trials}: "
                f"{n(TrialState.RUNNING)} running, {n(TrialState.SUCCEEDED)} succeeded, {n(TrialState.PRUNED)} pruned, "
                f"{n(TrialState.FAILED)} failed; {best_txt}")
        if self.tty:
            self.out.write("\r" + line.ljust(self.width))
            self.width = len(line)
            self.out.flush()
        elif line.split("] ", 1)[1] != self.last.split("] ", 1)[-1]:
            print(line, file=self.out, flush=True)
        self.last = line

    def end(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()


if __name__ == "__main__":
    sys.exit(main())
