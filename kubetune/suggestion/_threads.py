"""Single-threaded BLAS for the samplers' small matrices.

An ask works on matrices of a few hundred rows. OpenBLAS spreads even those
over every core, and on a busy machine (a suggestion service next to trials)
the thread hand-offs cost far more than the arithmetic: a GP ask measured
50-190 ms with threads and 7-11 ms without. threadpoolctl is optional: without
it, nothing changes.
"""

from __future__ import annotations

import contextlib
import functools

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - optional
    ThreadpoolController = None

_controller = None


def one_blas_thread():
    global _controller
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def small_linear_algebra(method):
    """Runs the method with BLAS on one thread."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return method(*args, **kwargs)

    return wrapper
