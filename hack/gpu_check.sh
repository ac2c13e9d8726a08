#!/usr/bin/env bash
# The checks that need a GPU (CI has none): the trial image's PyTorch trainer and the
# checkpoint helpers on CUDA.
#   1. tests/test_checkpoint.py: an exploit's model and optimizer state come back on the
#      GPU, from the donor's checkpoint at the judged step (the test adds a cuda case
#      when torch sees a GPU);
#   2. `kubetune run examples/pbt.yaml`: 8 PBT trainers on the GPU, exploits copying
#      checkpoints of CUDA models, the best trial's lineage printed;
#   3. `python -m bench.pbt --e2e-seeds N`: PBT against the fixed population end to end
#      with GPU trainers (the in-process part stays on the CPU, as everywhere).
# Needs python3 with torch (CUDA), numpy, scipy, scikit-learn, pyyaml, threadpoolctl,
# pytest and pytest-timeout; no network, no cluster packages (hence --noconftest).
#   OUT=/tmp/gpu-check hack/gpu_check.sh [e2e seeds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kubetune-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
shim=$(mktemp -d)  # the examples start their trainers as `python` (a script: a venv's python is not found through a link)
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$py")" > "$shim/python"
chmod +x "$shim/python"
export PATH=$shim:$PATH

nvidia-smi -L | tee "$OUT/gpu.txt"
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

python -m pytest -p no:cacheprovider --noconftest tests/test_checkpoint.py -k pytorch -v 2>&1 | tee "$OUT/pytest.log"
grep -q "test_pytorch_exploit.*\[cuda\] PASSED" "$OUT/pytest.log"

state=$(mktemp -d)
(cd examples && python -m kubetune.cli run pbt.yaml --state-dir "$state") 2>&1 | tee "$OUT/pbt_run.log"
cat "$state"/pbt/trials/*/output.log > "$OUT/pbt_trainers.log"
on_gpu=$(grep -c "device=cuda" "$OUT/pbt_trainers.log" || true)
exploits=$(grep -c "exploit: took trial" "$OUT/pbt_trainers.log" || true)
echo "trainer starts on cuda: $on_gpu; exploits taken: $exploits" | tee -a "$OUT/pbt_run.log"
[ "$on_gpu" -ge 8 ] && [ "$exploits" -ge 1 ]
grep -q "lineage of the best trial" "$OUT/pbt_run.log"

python -m bench.pbt --seeds 3 --e2e-seeds "${1:-3}" 2>&1 | tee "$OUT/bench_pbt.log"
