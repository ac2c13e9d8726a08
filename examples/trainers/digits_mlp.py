"""A small neural network on scikit-learn's bundled digits, trained epoch by epoch.

Uses the kubetune trial SDK: reads its parameters with trial.params() and reports
validation accuracy after each epoch (so early stopping can act on it).
Runs on its own too: `python digits_mlp.py` uses the defaults below.
"""

import warnings

from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from kubetune import trial

DEFAULTS = {"lr": 1e-3, "hidden": 64, "alpha": 1e-4, "activation": "relu", "optimizer": "adam",
            "momentum": 0.9, "epochs": 12}


def train(p: dict) -> None:
    X, y = load_digits(return_X_y=True)
    X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    X_train, X_val = scaler.transform(X_train), scaler.transform(X_val)
    model = MLPClassifier(
        hidden_layer_sizes=(int(p["hidden"]),), activation=p["activation"], solver=p["optimizer"],
        learning_rate_init=float(p["lr"]), alpha=float(p["alpha"]), momentum=float(p["momentum"]),
        batch_size=64, random_state=0,
    )
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    for epoch in range(1, int(p["epochs"]) + 1):
        model.partial_fit(X_train, y_train, classes=list(range(10)))
        accuracy = model.score(X_val, y_val)
        if trial.report(step=epoch, val_accuracy=accuracy, train_loss=model.loss_).stop:
            break


if __name__ == "__main__":
    train(trial.params(DEFAULTS))
