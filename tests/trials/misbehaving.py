"""A trial that misbehaves on purpose, chosen by its `mode` parameter."""

import sys
import time

mode = sys.argv[1]
if mode == "ok":
    print("epoch=1 loss=0.5")
elif mode == "crash":
    print("loading data")
    print("RuntimeError: CUDA out of memory (simulated)", file=sys.stderr, flush=True)
    sys.exit(3)
elif mode == "hang":
    print("epoch=1 loss=0.9", flush=True)
    time.sleep(600)
elif mode == "garbage":
    sys.stdout.buffer.write(b"\x00\xff\xfe loss=abc accuracy==? \x80\n%%%% epoch=two\n")
