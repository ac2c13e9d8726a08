"""kubetune: hyperparameter optimisation as a Kubernetes operator, and on one machine."""

__version__ = "0.1.0"
