"""A PBT trial for the cluster tests: a weight w trained toward 1.0 at rate lr.

It checkpoints w every step; when PBT says exploit it copies the donor trial's
checkpoint (verified) and continues with the new lr, in the same process.
START_DELAY and CRASH_TRIAL/CRASH_STEP make members start apart and one die.
"""

import os
import time

from kubetune import trial
from kubetune.trial import checkpoint

p = trial.params()
lr, w = p["lr"], 0.0
number = int(os.environ.get("KUBETUNE_TRIAL", "0"))
# Optional: trial n starts n * START_DELAY seconds late; trial CRASH_TRIAL exits with an error at CRASH_STEP.
time.sleep(number * float(os.environ.get("START_DELAY", "0")))
for step in range(1, int(os.environ.get("STEPS", "24")) + 1):
    if os.environ.get("CRASH_TRIAL") == str(number) and step == int(os.environ.get("CRASH_STEP", "0")):
        raise SystemExit(f"trial {number} crashes at step {step} (on purpose)")
    time.sleep(float(os.environ.get("STEP_SECONDS", "0.05")))
    w += lr * (1.0 - w)
    checkpoint.save({"w": w}, step)
    d = trial.report(step=step, score=w)
    if d.stop:
        break
    if d.action == "exploit":
        checkpoint.copy_from(d)  # the donor's checkpoint from the step it was judged at
        w, lr = checkpoint.load()["w"], d.params["lr"]
        print(f"step={step} exploited trial {d.donor}: w={w:.4f} lr={lr:.4f}", flush=True)
