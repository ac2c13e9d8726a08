"""A trial for the cluster tests: a learning curve whose level depends on x.

It reports `score` every step through the SDK (the Redis bus in a pod) and
stops when the scheduler says so. STEP_SECONDS slows it down for tests that
need trials in flight; JITTER adds noise below 1e-9, as a real trainer's
values differ from run to run.
"""

import os
import random
import time

from kubetune import trial

p = trial.params()
steps = int(os.environ.get("STEPS", "9"))
step_seconds = float(os.environ.get("STEP_SECONDS", "0.05"))
if os.environ.get("KUBETUNE_ATTEMPT", "1") == "1":  # FIRST_ATTEMPT_STEP_SECONDS: a first pod that outlives its retry
    step_seconds = float(os.environ.get("FIRST_ATTEMPT_STEP_SECONDS", step_seconds))
for step in range(1, steps + 1):
    time.sleep(step_seconds)
    level = 1.0 - (p["x"] - 0.3) ** 2
    score = level * (1 - 0.5 ** step) + (random.random() * 1e-9 if os.environ.get("JITTER") else 0.0)
    decision = trial.report(step=step, score=score)
    if decision.stop:
        print(f"stopped at step {step}: {decision.reason}", flush=True)
        break
