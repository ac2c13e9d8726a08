#!/bin/sh
# Runs the trial's command. The operator passes the command in the pod spec;
# this wrapper only makes sure the trial's folder exists and reports the GPU it sees.
set -e
mkdir -p "${KUBETUNE_TRIAL_DIR:-/kubetune/trial}"
python -c "import torch; print('kubetune-trial: cuda available =', torch.cuda.is_available())" || true
exec "$@"
