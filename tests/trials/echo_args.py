"""Reports what it was given: its arguments and environment, as metrics and a JSON file."""

import json
import os
import sys

with open(os.path.join(os.environ["KUBETUNE_TRIAL_DIR"], "seen.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "params": json.loads(os.environ["KUBETUNE_PARAMS"]),
               "env": {k: v for k, v in os.environ.items() if k.startswith("KUBETUNE_") or k == "EXTRA"},
               "cwd": os.getcwd()}, f)
print(f"loss={float(os.environ['KUBETUNE_PARAM_LR'])}")
