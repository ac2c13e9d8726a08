"""tests/trials/curve.py's values, every step at once, then an exit as fast as a process can make it.

The SDK's client batches such reports and sends the last batch as the process exits (atexit); here
that is all the exit does (os._exit skips the interpreter's teardown), so the runner sees the exit
right behind those reports.
"""

import atexit
import os

from kubetune import trial

p = trial.params()
for step in range(1, int(os.environ.get("STEPS", "95")) + 1):
    trial.report(step=step, score=(1.0 - (p["x"] - 0.3) ** 2) * (1 - 0.5 ** step))
atexit._run_exitfuncs()  # the client's flush
os._exit(0)
