"""A trial that ignores SIGTERM and the decisions it is given, and goes on reporting.

It writes $MARKER_DIR/term when it gets SIGTERM, and $MARKER_DIR/survived if it
reaches its own end (after $RUN_SECONDS): only SIGKILL stops it before then.
"""

import os
import signal
import time
from pathlib import Path

markers = Path(os.environ["MARKER_DIR"])
signal.signal(signal.SIGTERM, lambda *_: (markers / "term").touch())

from kubetune import trial  # noqa: E402 - after the handler: the timeout may come while this imports
end = time.monotonic() + float(os.environ.get("RUN_SECONDS", "30"))
step = 0
while time.monotonic() < end:
    step += 1
    trial.report(step=step, loss=1.0 / step)  # the answer (stop, once timed out) is ignored
    time.sleep(0.2)
(markers / "survived").touch()
