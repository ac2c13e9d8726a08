"""A trial that takes a moment, reports through the SDK, and records that it finished.

The record (one line per finished run, in $COUNT_FILE) lets a test count how
many times each trial ran to completion.
"""

import os
import sys
import time

from kubetune import trial

p = trial.params()
# Odd and even trials take different times, so parallel trials do not finish together.
seconds = float(os.environ.get("STEP_SECONDS", "0.3")) * (1 + 0.5 * (int(os.environ["KUBETUNE_TRIAL"]) % 2))
for step in range(1, 4):
    time.sleep(seconds)
    trial.report(step=step, loss=(p["x"] - 1) ** 2 + 1.0 / step)
with open(os.environ["COUNT_FILE"], "a") as f:
    f.write(os.environ["KUBETUNE_TRIAL"] + "\n")
sys.exit(0)
