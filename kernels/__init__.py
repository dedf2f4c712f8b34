"""Steering kernels: slot-bank layout, torch reference, Triton kernel, backend pick.

Importing this package needs only torch; Triton is imported lazily, the first
time ``steer_residual_triton`` / ``sas_delta_triton`` / ``HAVE_TRITON`` is accessed
or a CUDA backend is requested from :func:`get_steer_backend` / :func:`get_sas_backend`.
"""

from __future__ import annotations

from typing import Any

from .backend import BACKEND_ENV, SasFn, SteerFn, get_sas_backend, get_steer_backend
from .bank_layout import NORM_EPS, BankLayout
from .sas_reference import sae_activate, sas_delta_torch
from .steer_reference import check_steer_args, steer_residual_torch

__all__ = [
    "BACKEND_ENV",
    "BankLayout",
    "HAVE_TRITON",
    "NORM_EPS",
    "SasFn",
    "SteerFn",
    "check_steer_args",
    "get_sas_backend",
    "get_steer_backend",
    "sae_activate",
    "sas_delta_torch",
    "sas_delta_triton",
    "steer_residual_torch",
    "steer_residual_triton",
]

_LAZY = {"steer_residual_triton", "HAVE_TRITON"}
_LAZY_SAS = {"sas_delta_triton"}


def __getattr__(name: str) -> Any:  # PEP 562: lazy Triton import
    if name in _LAZY:
        from . import steer_triton

        return getattr(steer_triton, name)
    if name in _LAZY_SAS:
        from . import sas_triton

        return getattr(sas_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY | _LAZY_SAS)
