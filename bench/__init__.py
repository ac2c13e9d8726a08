"""Benchmarks (not part of the package). Run from the repository root: `python -m bench.samplers`.

Both libraries run with one BLAS/OpenMP thread per process: the benchmark runs
two processes on two cores, and threads fighting over them would measure the
machine, not the algorithms.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
