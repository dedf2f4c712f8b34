"""Steering kernels: slot-bank layout, torch reference, Triton kernel, backend pick.

Importing this package needs only torch; Triton is imported lazily, the first
time ``steer_residual_triton`` / ``HAVE_TRITON`` is accessed or a CUDA backend
is requested from :func:`get_steer_backend`.
"""

from __future__ import annotations

from typing import Any

from .backend import BACKEND_ENV, SteerFn, get_steer_backend
from .bank_layout import NORM_EPS, BankLayout
from .steer_reference import check_steer_args, steer_residual_torch

__all__ = [
    "BACKEND_ENV",
    "BankLayout",
    "HAVE_TRITON",
    "NORM_EPS",
    "SteerFn",
    "check_steer_args",
    "get_steer_backend",
    "steer_residual_torch",
    "steer_residual_triton",
]

_LAZY = {"steer_residual_triton", "HAVE_TRITON"}


def __getattr__(name: str) -> Any:  # PEP 562: lazy Triton import
    if name in _LAZY:
        from . import steer_triton

        return getattr(steer_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
