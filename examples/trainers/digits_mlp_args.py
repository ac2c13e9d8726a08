"""The digits network with its parameters on the command line instead of trial.params()."""

import argparse

from digits_mlp import DEFAULTS, train

parser = argparse.ArgumentParser()
parser.add_argument("--optimizer", default="adam")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--hidden", type=int, default=64)
train({**DEFAULTS, **vars(parser.parse_args())})
