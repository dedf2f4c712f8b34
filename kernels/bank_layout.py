"""Layout of one row of a per-layer steering slot bank.

A bank is a float32 tensor ``[num_slots, W]`` with ``W = 2*d + 2*K*d + 1``
(``d`` = hidden size, ``K`` = rank = maximum ablation rank). Along the last dim::

    [0      : d         ]  m     per-neuron multiplicative factor (identity 1)
    [d      : 2d        ]  a     additive shift                    (identity 0)
    [2d     : 2d + K*d  ]  L     K vectors of length d, row-major   (identity 0)
    [2d+K*d : 2d + 2K*d ]  R     K vectors of length d, row-major   (identity 0)
    [W-1]                  flag  renormalize to ||h|| (0.0 or 1.0)  (identity 0)

Applied to a residual-stream vector ``h`` (see :mod:`steer_reference`)::

    out = h * m - sum_k (h . L_k) R_k + a
    if flag: out = out * ||h|| / max(||out||, 1e-6)

Slot 0 of every bank is the identity row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BankLayout", "NORM_EPS"]

#: Lower clamp on ``||out||`` in the renormalization (avoids 0/0).
NORM_EPS: float = 1e-6


def _as_f32(x: torch.Tensor | float | list, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32, device=device)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values")
    return t


@dataclass(frozen=True)
class BankLayout:
    """Slot-bank row layout for hidden size ``d`` and ablation rank ``K``.

    Attributes:
        hidden_size: d, the model hidden size (> 0).
        rank: K, the maximum low-rank ablation rank (>= 0), fixed at engine build.
    """

    hidden_size: int
    rank: int

    def __post_init__(self) -> None:
        if int(self.hidden_size) != self.hidden_size or self.hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {self.hidden_size!r}")
        if int(self.rank) != self.rank or self.rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {self.rank!r}")

    # ------------------------------------------------------------------ sizes
    @property
    def width(self) -> int:
        """W = 2*d + 2*K*d + 1."""
        d, k = self.hidden_size, self.rank
        return 2 * d + 2 * k * d + 1

    @property
    def m_slice(self) -> slice:
        """Columns of the multiplicative factor m: ``[0, d)``."""
        return slice(0, self.hidden_size)

    @property
    def a_slice(self) -> slice:
        """Columns of the additive shift a: ``[d, 2d)``."""
        d = self.hidden_size
        return slice(d, 2 * d)

    @property
    def l_slice(self) -> slice:
        """Columns of L (K*d values, K vectors row-major): ``[2d, 2d+K*d)``."""
        d, k = self.hidden_size, self.rank
        return slice(2 * d, 2 * d + k * d)

    @property
    def r_slice(self) -> slice:
        """Columns of R (K*d values, K vectors row-major): ``[2d+K*d, 2d+2K*d)``."""
        d, k = self.hidden_size, self.rank
        return slice(2 * d + k * d, 2 * d + 2 * k * d)

    @property
    def flag_index(self) -> int:
        """Column of the normalize flag: ``W - 1``."""
        return self.width - 1

    @property
    def flag_slice(self) -> slice:
        """``slice(W-1, W)`` (keeps a trailing dim of 1)."""
        return slice(self.width - 1, self.width)

    # ---------------------------------------------------------------- helpers
    def identity_row(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Return the identity row (m=1, a=0, L=R=0, flag=0) as float32 ``[W]``."""
        row = torch.zeros(self.width, dtype=torch.float32, device=device)
        row[self.m_slice] = 1.0
        return row

    def identity_bank(self, num_slots: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Return a float32 ``[num_slots, W]`` bank whose rows are all identity."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        return self.identity_row(device).unsqueeze(0).repeat(num_slots, 1)

    def pack_row(
        self,
        m: torch.Tensor | None = None,
        a: torch.Tensor | None = None,
        L: torch.Tensor | None = None,
        R: torch.Tensor | None = None,
        normalize: bool = False,
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Pack steering parameters into one float32 bank row ``[W]``.

        Args:
            m: ``[d]`` multiplicative factor; None means all ones.
            a: ``[d]`` additive shift; None means zeros.
            L: ``[k, d]`` (or ``[d]`` for k=1) with ``k <= K``; rows beyond k are zero.
            R: same shape as ``L``; ``out -= sum_k (h . L_k) R_k``.
            normalize: rescale ``out`` to ``||h||``.
            device: where to build the row (default: device of the first given
                tensor, else CPU).

        Returns:
            float32 tensor ``[W]``.

        Raises:
            ValueError: on shape mismatch, ``k > K``, or non-finite values.
        """
        d, K = self.hidden_size, self.rank
        if device is None:
            for t in (m, a, L, R):
                if isinstance(t, torch.Tensor):
                    device = t.device
                    break
        dev = torch.device(device) if device is not None else torch.device("cpu")
        row = self.identity_row(dev)
        if m is not None:
            mt = _as_f32(m, "m", dev)
            if mt.shape != (d,):
                raise ValueError(f"m must have shape ({d},), got {tuple(mt.shape)}")
            row[self.m_slice] = mt
        if a is not None:
            at = _as_f32(a, "a", dev)
            if at.shape != (d,):
                raise ValueError(f"a must have shape ({d},), got {tuple(at.shape)}")
            row[self.a_slice] = at
        if (L is None) != (R is None):
            raise ValueError("L and R must be given together")
        if L is not None and R is not None:
            Lt = _as_f32(L, "L", dev)
            Rt = _as_f32(R, "R", dev)
            if Lt.dim() == 1:
                Lt = Lt.unsqueeze(0)
            if Rt.dim() == 1:
                Rt = Rt.unsqueeze(0)
            if Lt.dim() != 2 or Lt.shape[1] != d or Lt.shape != Rt.shape:
                raise ValueError(
                    f"L and R must both have shape [k, {d}], got {tuple(Lt.shape)} and {tuple(Rt.shape)}"
                )
            k = Lt.shape[0]
            if k > K:
                raise ValueError(f"ablation rank {k} exceeds the bank rank {K}")
            if k:
                lo = self.l_slice.start
                ro = self.r_slice.start
                row[lo : lo + k * d] = Lt.reshape(-1)
                row[ro : ro + k * d] = Rt.reshape(-1)
        row[self.flag_index] = 1.0 if normalize else 0.0
        return row

    def unpack_row(
        self, row: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Inverse of :meth:`pack_row`: ``(m [d], a [d], L [K, d], R [K, d], normalize)`` (views)."""
        if row.shape != (self.width,):
            raise ValueError(f"row must have shape ({self.width},), got {tuple(row.shape)}")
        d, K = self.hidden_size, self.rank
        return (
            row[self.m_slice],
            row[self.a_slice],
            row[self.l_slice].view(K, d),
            row[self.r_slice].view(K, d),
            bool(row[self.flag_index] != 0),
        )

    def is_identity_row(self, row: torch.Tensor) -> bool:
        """True when ``row`` equals the identity row exactly (host-side check)."""
        return bool(torch.equal(row.to(torch.float32), self.identity_row(row.device)))
