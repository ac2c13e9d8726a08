"""kubetune: hyperparameter optimisation as a Kubernetes operator, and on one machine."""

__version__ = "0.1.0"

from .study import SearchExhausted, Study  # noqa: E402

__all__ = ["SearchExhausted", "Study", "__version__"]
