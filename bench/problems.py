"""Benchmark problems: synthetic functions and small scikit-learn models (all minimised).

Each problem is a search space in kubetune's spec form and a function of one
configuration. The same space is given to Optuna through `optuna_params`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np

from kubetune.api.space import SearchSpace


@dataclass
class Problem:
    name: str
    params: list[dict]
    fn: Callable[[dict], float]
    optimum: float | None = None
    note: str = ""
    space: SearchSpace = field(init=False)

    def __post_init__(self):
        self.space = SearchSpace.from_spec(self.params)

    def __call__(self, config: dict) -> float:
        return float(self.fn(config))


def box(names, low, high):
    return [{"name": n, "type": "double", "min": float(low), "max": float(high)} for n in names]


def vec(config: dict, d: int) -> np.ndarray:
    return np.array([config[f"x{i}"] for i in range(d)])


# -- synthetic -------------------------------------------------------------------


def branin(c):
    x1, x2 = c["x0"], c["x1"]
    b, cc, r, s, t = 5.1 / (4 * math.pi ** 2), 5 / math.pi, 6, 10, 1 / (8 * math.pi)
    return (x2 - b * x1 ** 2 + cc * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s


_H_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
_H_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                        [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])
_H_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann6(c, shift=0.0):
    x = vec(c, 6) + shift
    return float(-(_H_ALPHA * np.exp(-(_H_A * (x - _H_P) ** 2).sum(1))).sum())


def rosenbrock(c, d=4):
    x = vec(c, d)
    return float((100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())


def styblinski_tang(c, d=5, shift=0.0):
    x = vec(c, d) + shift
    return float(0.5 * (x ** 4 - 16 * x ** 2 + 5 * x).sum())


def ackley(c, d=10):
    x = vec(c, d)
    return float(-20 * math.exp(-0.2 * math.sqrt((x ** 2).mean())) - math.exp(np.cos(2 * math.pi * x).mean()) + 20 + math.e)


MIXED_PARAMS = [
    {"name": "lr", "type": "double", "min": 1e-5, "max": 1.0, "log": True},
    {"name": "layers", "type": "int", "min": 1, "max": 8},
    {"name": "width", "type": "int", "min": 16, "max": 1024, "log": True},
    {"name": "dropout", "type": "double", "min": 0.0, "max": 0.5},
    {"name": "optimizer", "type": "categorical", "values": ["adam", "sgd", "rmsprop", "adagrad"]},
    {"name": "momentum", "type": "double", "min": 0.0, "max": 0.99, "when": {"optimizer": "sgd"}},
    {"name": "beta2", "type": "double", "min": 0.9, "max": 0.9999, "when": {"optimizer": ["adam", "rmsprop"]}},
    {"name": "activation", "type": "categorical", "values": ["relu", "tanh", "gelu"]},
]


def mixed(c):
    """A synthetic 'training loss' with interactions, categorical and conditional parameters."""
    opt = c["optimizer"]
    best_lr = {"adam": -3.0, "sgd": -1.5, "rmsprop": -3.5, "adagrad": -2.0}[opt]
    loss = 0.3 * (math.log10(c["lr"]) - best_lr) ** 2
    capacity = c["layers"] * math.log2(c["width"])
    loss += 0.02 * (capacity - 24) ** 2 / 10 + 0.5 * (c["dropout"] - 0.1 - 0.01 * c["layers"]) ** 2
    loss += {"adam": 0.0, "sgd": 0.15, "rmsprop": 0.1, "adagrad": 0.3}[opt]
    if opt == "sgd":
        loss += 1.5 * (c["momentum"] - 0.9) ** 2
    if opt in ("adam", "rmsprop"):
        loss += 200 * (c["beta2"] - 0.999) ** 2
    loss += {"relu": 0.05, "tanh": 0.12, "gelu": 0.0}[c["activation"]]
    return loss


# -- scikit-learn models -----------------------------------------------------------


@lru_cache(maxsize=None)
def _data(name):
    from sklearn import datasets
    from sklearn.preprocessing import StandardScaler

    x, y = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine,
            "digits": datasets.load_digits}[name](return_X_y=True)
    return StandardScaler().fit_transform(x), y


def _cv_log_loss(model, data) -> float:
    """3-fold cross-validated log-loss (the same folds for every configuration).

    A continuous score: the CV error of these small data sets is quantised at one sample
    (1/178 on wine, where random search already finds the minimum, 1/569 on breast cancer),
    so most cells were ties that measured nothing.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x, y = _data(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = cross_val_score(model, x, y, cv=StratifiedKFold(3, shuffle=True, random_state=0), scoring="neg_log_loss")
    value = -float(score.mean())
    return value if math.isfinite(value) else 40.0  # 40 > any clipped log-loss: a diverged model


SVM_PARAMS = [
    {"name": "C", "type": "double", "min": 1e-2, "max": 1e3, "log": True},
    {"name": "kernel", "type": "categorical", "values": ["rbf", "poly", "sigmoid"]},
    {"name": "gamma", "type": "double", "min": 1e-5, "max": 1.0, "log": True},
    {"name": "degree", "type": "int", "min": 2, "max": 5, "when": {"kernel": "poly"}},
    {"name": "coef0", "type": "double", "min": 0.0, "max": 1.0, "when": {"kernel": ["poly", "sigmoid"]}},
]


def svm_cancer(c):
    from sklearn.svm import SVC

    # probability=True: Platt scaling on an internal CV (seeded), so the model has a log-loss.
    return _cv_log_loss(SVC(C=c["C"], kernel=c["kernel"], gamma=c["gamma"], degree=c.get("degree", 3),
                            coef0=c.get("coef0", 0.0), max_iter=3000, probability=True, random_state=0),
                        "breast_cancer")


SGD_PARAMS = [
    {"name": "alpha", "type": "double", "min": 1e-7, "max": 1e-1, "log": True},
    # Only the losses with class probabilities (hinge and perceptron have none to score).
    {"name": "loss", "type": "categorical", "values": ["log_loss", "modified_huber"]},
    {"name": "penalty", "type": "categorical", "values": ["l2", "l1", "elasticnet"]},
    {"name": "l1_ratio", "type": "double", "min": 0.0, "max": 1.0, "when": {"penalty": "elasticnet"}},
    {"name": "eta0", "type": "double", "min": 1e-4, "max": 1.0, "log": True},
    {"name": "learning_rate", "type": "categorical", "values": ["constant", "invscaling", "adaptive"]},
    {"name": "max_iter", "type": "int", "min": 5, "max": 30},
]


def sgd_wine(c):
    from sklearn.linear_model import SGDClassifier

    return _cv_log_loss(SGDClassifier(alpha=c["alpha"], loss=c["loss"], penalty=c["penalty"],
                                      l1_ratio=c.get("l1_ratio", 0.15), eta0=c["eta0"],
                                      learning_rate=c["learning_rate"], max_iter=c["max_iter"], tol=None,
                                      random_state=0), "wine")


PROBLEMS = {
    p.name: p
    for p in [
        Problem("branin-2d", box(["x0"], -5, 10) + box(["x1"], 0, 15), branin, 0.397887),
        Problem("hartmann-6d", box([f"x{i}" for i in range(6)], 0, 1), hartmann6, -3.32237),
        Problem("rosenbrock-4d", box([f"x{i}" for i in range(4)], -2.048, 2.048), rosenbrock, 0.0),
        Problem("styblinski-tang-5d", box([f"x{i}" for i in range(5)], -5, 5), styblinski_tang, -39.16617 * 5),
        # Off-centre bounds: the optimum (0) is not the middle of the box, which CMA-ES would start at.
        Problem("ackley-10d", box([f"x{i}" for i in range(10)], -15, 30), ackley, 0.0),
        Problem("mixed-conditional", MIXED_PARAMS, mixed, None, "categorical + conditional + log + int"),
        Problem("svm-breast_cancer-logloss", SVM_PARAMS, svm_cancer, None, "SVC, 3-fold CV log-loss"),
        Problem("sgd-wine-logloss", SGD_PARAMS, sgd_wine, None, "SGDClassifier (probabilistic losses), 3-fold CV log-loss"),
    ]
}


def optuna_params(trial, problem: Problem) -> dict:
    """The problem's configuration suggested through an Optuna trial (define-by-run, same conditions)."""
    out: dict = {}
    for p in problem.space:
        if not problem.space.is_active(p, out):
            continue
        if p.type == "double":
            out[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            out[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log, step=p.step or 1)
        else:
            out[p.name] = trial.suggest_categorical(p.name, list(p.values))
    return out
