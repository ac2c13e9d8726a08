"""Records real learning curves once: an sklearn MLPClassifier on the digits data,
trained epoch by epoch with partial_fit, for random configurations.

    python bench/record_curves.py [--configs 400] [--epochs 27]

Writes bench/data/mlp_digits_curves.npz (validation accuracy and seconds per
epoch of each configuration, and the configurations). bench/schedulers.py
replays it; re-run this only to change the table.
"""

from __future__ import annotations

import os

# One BLAS thread per process: small matrices, two processes on two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SPACE = [
    {"name": "lr", "type": "double", "min": 1e-4, "max": 0.3, "log": True},
    {"name": "alpha", "type": "double", "min": 1e-6, "max": 1e-1, "log": True},
    {"name": "units", "type": "int", "min": 4, "max": 128, "log": True},
    {"name": "layers", "type": "int", "min": 1, "max": 3},
    {"name": "batch", "type": "discrete", "values": [16, 32, 64, 128, 256]},
    {"name": "solver", "type": "categorical", "values": ["adam", "sgd"]},
    {"name": "momentum", "type": "double", "min": 0.0, "max": 0.99},
]
OUT = Path(__file__).parent / "data" / "mlp_digits_curves.npz"


def curve(args):
    params, epochs, seed = args
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    model = MLPClassifier(hidden_layer_sizes=(params["units"],) * params["layers"], alpha=params["alpha"],
                          learning_rate_init=params["lr"], batch_size=params["batch"], solver=params["solver"],
                          momentum=params["momentum"], random_state=seed)
    acc, secs = [], []
    classes = np.unique(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(epochs):
            t0 = time.perf_counter()
            model.partial_fit(xtr, ytr, classes=classes)
            secs.append(time.perf_counter() - t0)
            a = model.score(xva, yva)
            acc.append(a if np.isfinite(a) else 0.0)
    return acc, secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=27)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    from kubetune.api.space import SearchSpace

    space = SearchSpace.from_spec(SPACE)
    rng = np.random.default_rng(2024)
    configs = [space.canonical(space.sample(rng)) for _ in range(a.configs)]
    t0 = time.time()
    with ProcessPoolExecutor(a.workers) as pool:
        results = list(pool.map(curve, [(c, a.epochs, i) for i, c in enumerate(configs)], chunksize=4))
    acc = np.array([r[0] for r in results], dtype=np.float32)
    secs = np.array([r[1] for r in results], dtype=np.float32)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, acc=acc, secs=secs, configs=json.dumps(configs), space=json.dumps(SPACE))
    print(f"{a.configs} configurations x {a.epochs} epochs in {time.time() - t0:.0f} s -> {OUT} "
          f"({OUT.stat().st_size / 1e3:.0f} kB); best final accuracy {acc[:, -1].max():.4f}")


if __name__ == "__main__":
    main()
