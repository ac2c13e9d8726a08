"""A small PyTorch network on scikit-learn's bundled digits: the example trainer for ASHA and PBT.

It follows the scheduler's decisions through the kubetune SDK:
  - stop:    pruned (ASHA, median...): exit now;
  - pause:   checkpointed at a rung (promotion ASHA, HyperBand): exit, to be resumed later;
  - exploit: PBT: load the donor trial's checkpoint (copied and verified) and go on
             with the new learning rate and momentum, in the same process.
Started again after a pause it restores its own checkpoint and goes on from there.
Runs on the GPU when there is one, else on the CPU.
"""

import os

import torch
from sklearn.datasets import load_digits
from torch import nn

from kubetune import trial
from kubetune.trial import pytorch as ckpt

p = trial.params({"lr": 0.05, "momentum": 0.9, "hidden": 64, "epochs": 20})
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32, device=device)
y = torch.tensor(y, device=device)
g = torch.Generator().manual_seed(0)
order = torch.randperm(len(X), generator=g).to(device)
train, val = order[:1200], order[1200:]

model = nn.Sequential(nn.Linear(64, int(p["hidden"])), nn.ReLU(), nn.Linear(int(p["hidden"]), 10)).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"])


def set_hyperparameters(params):
    for group in optimizer.param_groups:
        group["lr"], group["momentum"] = params["lr"], params["momentum"]


start = int(ckpt.restore(model, optimizer, map_location=device) or 0)  # resume after a pause
print(f"device={device} starting at epoch {start + 1}", flush=True)
# How far to train: the scheduler's budget for this run (HyperBand), else EPOCHS, else the parameter.
epochs = int(float(os.environ.get("KUBETUNE_BUDGET") or os.environ.get("EPOCHS") or p["epochs"]))
for epoch in range(start + 1, epochs + 1):
    model.train()
    for batch in torch.split(train[torch.randperm(len(train), generator=g).to(device)], 64):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X[batch]), y[batch])
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(X[val]).argmax(1) == y[val]).float().mean().item()
    ckpt.save(model, optimizer, step=epoch)
    d = trial.report(step=epoch, val_accuracy=accuracy, train_loss=loss.item())
    if d.stop or d.pause:
        break
    if d.action == "exploit":
        ckpt.restore(model, optimizer, donor=d.donor, map_location=device)
        set_hyperparameters(d.params)
        print(f"epoch={epoch} exploit: took trial {d.donor}'s checkpoint, lr={d.params['lr']:.4g}", flush=True)
