"""A trial for the cluster tests: a learning curve whose level depends on x.

It reports `score` every step through the SDK (the Redis bus in a pod) and
stops (or pauses) when the scheduler says so. STEP_SECONDS slows it down for tests that
need trials in flight; JITTER adds noise below 1e-9, as a real trainer's values differ
from run to run; IGNORE_PAUSE=k trains (and saves) k steps past a pause before it exits.
"""

import os
import random
import time

from kubetune import trial
from kubetune.trial import checkpoint

p = trial.params()
# A gate: trials numbered HOLD_FROM and up wait for HOLD_FILE to exist (a trial in flight for as long as a test needs).
if "HOLD_FROM" in os.environ and int(os.environ["KUBETUNE_TRIAL"]) >= int(os.environ["HOLD_FROM"]):
    while not os.path.exists(os.environ["HOLD_FILE"]):
        time.sleep(0.05)
steps = int(os.environ.get("STEPS", "9"))
step_seconds = float(os.environ.get("STEP_SECONDS", "0.05"))
if os.environ.get("KUBETUNE_ATTEMPT", "1") == "1":  # FIRST_ATTEMPT_STEP_SECONDS: a first pod that outlives its retry
    step_seconds = float(os.environ.get("FIRST_ATTEMPT_STEP_SECONDS", step_seconds))
# With a checkpoint folder it saves its step after each report and starts after the last one saved (a
# paused trial resumed in a new pod), and runs only as far as its budget (the scheduler's next rung).
saving = bool(os.environ.get("KUBETUNE_CHECKPOINT_DIR"))
start = int((checkpoint.load() or {}).get("step", 0)) if saving else 0
# IGNORE_BUDGET: a trainer that knows no budget and trains until the scheduler says stop or pause.
end = steps if os.environ.get("IGNORE_BUDGET") else min(steps, int(float(os.environ.get("KUBETUNE_BUDGET") or steps)))
print(f"starting after step {start}, running to step {end}", flush=True)
ignore_pause = int(os.environ.get("IGNORE_PAUSE") or 0)
overrun = None  # with IGNORE_PAUSE: the step it exits after
step = start
while step < (end if overrun is None else overrun):
    step += 1
    time.sleep(step_seconds)
    level = 1.0 - (p["x"] - 0.3) ** 2
    score = level * (1 - 0.5 ** step) + (random.random() * 1e-9 if os.environ.get("JITTER") else 0.0)
    if saving:
        checkpoint.save({"step": step}, step=step)
    decision = trial.report(step=step, score=score)
    if decision.pause and ignore_pause:
        if overrun is None:
            overrun = min(steps, step + ignore_pause)
            print(f"pause at step {step} ignored: on to step {overrun}", flush=True)
    elif decision.stop or decision.pause:
        print(f"{decision.action} at step {step}: {decision.reason}", flush=True)
        break
