"""Backend selection for the steering op."""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .sas_reference import sas_delta_torch
from .steer_reference import steer_residual_torch

__all__ = ["SasFn", "SteerFn", "get_sas_backend", "get_steer_backend", "BACKEND_ENV"]

#: ``SteerFn(hidden, residual, bank, index, *, rank) -> Tensor``.
SteerFn = Callable[..., torch.Tensor]

#: ``SasFn(h, index, bank, w_enc_t, b_enc, w_dec, threshold, union, *, activation, k) -> Tensor``.
SasFn = Callable[..., torch.Tensor]

#: Environment override: ``torch`` forces the reference, ``triton`` requires Triton,
#: unset/``auto`` picks automatically.
BACKEND_ENV = "VSTEER_STEER_BACKEND"


def _triton_fn() -> Optional[SteerFn]:
    from . import steer_triton  # imports triton (guarded) only when needed

    return steer_triton.steer_residual_triton if steer_triton.HAVE_TRITON else None


def get_steer_backend(device: torch.device | str) -> SteerFn:
    """Return the steering implementation for ``device``.

    ``steer_residual_triton`` when ``device`` is CUDA, CUDA is available and
    Triton imports; ``steer_residual_torch`` otherwise. ``$VSTEER_STEER_BACKEND``
    = ``torch`` forces the reference; ``triton`` raises if Triton cannot be used.

    Args:
        device: target device (``torch.device`` or string like ``"cuda:0"``).

    Returns:
        A callable ``fn(hidden, residual, bank, index, *, rank) -> Tensor``.

    Raises:
        RuntimeError: ``VSTEER_STEER_BACKEND=triton`` but Triton/CUDA unusable.
        ValueError: unknown ``VSTEER_STEER_BACKEND`` value.
    """
    return _pick(device, steer_residual_torch, _triton_fn)


def _pick(device: torch.device | str, reference: Callable[..., torch.Tensor],
          triton_fn: Callable[[], Optional[Callable[..., torch.Tensor]]]) -> Callable[..., torch.Tensor]:
    """The Triton implementation on a usable CUDA device, else the torch reference
    (``$VSTEER_STEER_BACKEND`` may force either)."""
    dev = torch.device(device)
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be auto|torch|triton, got {choice!r}")
    if choice == "torch":
        return reference
    usable = dev.type == "cuda" and torch.cuda.is_available()
    fn = triton_fn() if usable else None
    if fn is not None:
        return fn
    if choice == "triton":
        raise RuntimeError(
            f"{BACKEND_ENV}=triton but Triton cannot be used on {dev} "
            f"(cuda available: {torch.cuda.is_available()})"
        )
    return reference


def _sas_triton_fn() -> Optional[SasFn]:
    from . import sas_triton  # imports triton (guarded) only when needed

    return sas_triton.sas_delta_triton if sas_triton.HAVE_TRITON else None


def get_sas_backend(device: torch.device | str) -> SasFn:
    """Return the SAS-delta implementation for ``device`` (same rules as :func:`get_steer_backend`).

    ``sas_delta_triton`` when ``device`` is CUDA, CUDA is available and Triton imports;
    ``sas_delta_torch`` otherwise. ``$VSTEER_STEER_BACKEND`` = ``torch`` forces the reference;
    ``triton`` raises if Triton cannot be used.

    Returns:
        A callable ``fn(h, index, bank, w_enc_t, b_enc, w_dec, threshold, union, *, activation, k)``.

    Raises:
        RuntimeError: ``VSTEER_STEER_BACKEND=triton`` but Triton/CUDA unusable.
        ValueError: unknown ``VSTEER_STEER_BACKEND`` value.
    """
    return _pick(device, sas_delta_torch, _sas_triton_fn)
