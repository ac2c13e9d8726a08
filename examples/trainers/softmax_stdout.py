"""Softmax regression on the digits in plain numpy, reporting through printed lines only.

It does not import kubetune: kubetune reads `epoch=3 val_accuracy=0.91` lines
from its output (the metricsCollector's default format).
"""

import argparse

import numpy as np
from sklearn.datasets import load_digits

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--l2", type=float, required=True)
parser.add_argument("--epochs", type=int, default=15)
args = parser.parse_args()

X, y = load_digits(return_X_y=True)
X = X / 16.0
rng = np.random.default_rng(0)
order = rng.permutation(len(X))
train, val = order[:1200], order[1200:]
W = np.zeros((X.shape[1], 10))
onehot = np.eye(10)[y]
for epoch in range(1, args.epochs + 1):
    logits = X[train] @ W
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    grad = X[train].T @ (probs - onehot[train]) / len(train) + args.l2 * W
    W -= args.lr * grad
    accuracy = float(((X[val] @ W).argmax(axis=1) == y[val]).mean())
    print(f"epoch={epoch} val_accuracy={accuracy:.4f}", flush=True)
