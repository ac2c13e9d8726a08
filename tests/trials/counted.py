"""A trial that takes a moment, reports through the SDK, and records that it finished.

The record (one line per finished run, in $COUNT_FILE) lets a test count how
many times each trial ran to completion.
"""

import os
import sys
import time

from kubetune import trial

p = trial.params()
# A gate: trials numbered HOLD_FROM and up wait for HOLD_FILE to exist, so that a test can interrupt a run
# that cannot have finished meanwhile, however slow or loaded the machine.
if "HOLD_FROM" in os.environ and int(os.environ["KUBETUNE_TRIAL"]) >= int(os.environ["HOLD_FROM"]):
    while not os.path.exists(os.environ["HOLD_FILE"]):
        time.sleep(0.05)
# Odd and even trials take different times, so parallel trials do not finish together.
seconds = float(os.environ.get("STEP_SECONDS", "0.3")) * (1 + 0.5 * (int(os.environ["KUBETUNE_TRIAL"]) % 2))
for step in range(1, 4):
    time.sleep(seconds)
    trial.report(step=step, loss=(p["x"] - 1) ** 2 + 1.0 / step)
with open(os.environ["COUNT_FILE"], "a") as f:
    f.write(os.environ["KUBETUNE_TRIAL"] + "\n")
sys.exit(0)
