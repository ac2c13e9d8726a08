"""A small PyTorch network on scikit-learn's bundled digits: the example trainer for ASHA and PBT.

It follows the scheduler's decisions through the kubetune SDK:
  - stop:    pruned (ASHA, median...): exit now;
  - pause:   checkpointed at a rung (promotion ASHA, HyperBand): exit, to be resumed later;
  - exploit: PBT: load the donor trial's checkpoint (copied and verified) and go on
             from the donor's epoch with the new learning rate, momentum and weight
             decay, in the same process. The epoch count is the model's: no model is
             trained more than EPOCHS epochs, whichever checkpoints it came through.
Started again after a pause it restores its own checkpoint and goes on from there.
Runs on the GPU when there is one, else on the CPU (one thread: the network is small).
Reports val_accuracy and val_loss (cross-entropy on the held-out 597 digits) each epoch.
HIDDEN sets the width of the hidden layer when it is not a searched parameter.

The model, data and one epoch of training are functions, so that bench/pbt.py can
train the same networks in one process, generation by generation.
"""

import math
import os

import torch
from sklearn.datasets import load_digits
from torch import nn

DEFAULTS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "hidden": int(os.environ.get("HIDDEN", 64)),
            "epochs": 20}


def load_data(device):
    """The 1797 digits, scaled; a fixed split: 1200 to train on, 597 to validate on."""
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(y, device=device)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0)).to(device)
    return X, y, order[:1200], order[1200:]


def build(params, device):
    """The network (the same initial weights for every trial) and its SGD optimizer."""
    torch.manual_seed(0)
    hidden = int(params["hidden"])
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=params["momentum"],
                                weight_decay=params.get("weight_decay", 0.0))
    return model, optimizer


def set_hyperparameters(optimizer, params):
    for group in optimizer.param_groups:
        group["lr"], group["momentum"] = params["lr"], params["momentum"]
        group["weight_decay"] = params.get("weight_decay", 0.0)


def train_epoch(model, optimizer, data, g):
    """One pass over the training digits in batches of 64; returns the last batch's loss."""
    X, y, train, _ = data
    model.train()
    for batch in torch.split(train[torch.randperm(len(train), generator=g).to(X.device)], 64):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X[batch]), y[batch])
        loss.backward()
        optimizer.step()
    return loss.item()


def evaluate(model, data):
    """(accuracy, cross-entropy) on the validation digits; a diverged network's loss is 1e6, not NaN."""
    X, y, _, val = data
    model.eval()
    with torch.no_grad():
        out = model(X[val])
        accuracy = (out.argmax(1) == y[val]).float().mean().item()
        val_loss = nn.functional.cross_entropy(out, y[val]).item()
    return accuracy, (val_loss if math.isfinite(val_loss) else 1e6)


def main():
    from kubetune import trial
    from kubetune.trial import pytorch as ckpt

    p = trial.params(DEFAULTS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    data = load_data(device)
    model, optimizer = build(p, device)
    g = torch.Generator().manual_seed(0)

    start = int(ckpt.restore(model, optimizer, map_location=device) or 0)  # resume after a pause
    print(f"device={device} starting at epoch {start + 1}", flush=True)
    # How far to train: the scheduler's budget for this run (HyperBand), else EPOCHS, else the parameter.
    epochs = int(float(os.environ.get("KUBETUNE_BUDGET") or os.environ.get("EPOCHS") or p["epochs"]))
    epoch = start
    while epoch < epochs:
        epoch += 1
        train_loss = train_epoch(model, optimizer, data, g)
        accuracy, val_loss = evaluate(model, data)
        ckpt.save(model, optimizer, step=epoch)
        d = trial.report(step=epoch, val_accuracy=accuracy, val_loss=val_loss, train_loss=train_loss)
        if d.stop or d.pause:
            break
        # At its last epoch nothing is left to train with the donor's model: the run records the
        # exploit as unused.
        if d.action == "exploit" and epoch < epochs:
            donor_epoch = ckpt.restore(model, optimizer, donor=d, map_location=device)
            set_hyperparameters(optimizer, d.params)
            print(f"epoch={epoch} exploit: took trial {d.donor}'s checkpoint (epoch {donor_epoch:g}), "
                  + ", ".join(f"{k}={v:.4g}" for k, v in d.params.items()), flush=True)
            epoch = int(donor_epoch)


if __name__ == "__main__":
    main()
