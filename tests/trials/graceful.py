"""A trial that, told to stop by SIGTERM, exits cleanly (code 0), as trainers that save on preemption do.

It reports step 1, touches $MARKER_DIR/<trial>.reported, then waits for $HOLD_FILE before its other steps.
"""

import os
import signal
import sys
import time
from pathlib import Path

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

from kubetune import trial  # noqa: E402 - after the handler

p = trial.params()
trial.report(step=1, loss=10.0 + p["x"])
(Path(os.environ["MARKER_DIR"]) / f"{os.environ['KUBETUNE_TRIAL']}.reported").touch()
while not os.path.exists(os.environ["HOLD_FILE"]):
    time.sleep(0.05)
for step in (2, 3):
    trial.report(step=step, loss=p["x"] / step)
