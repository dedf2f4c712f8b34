"""Sparse autoencoders over the residual stream: ReLU, JumpReLU and TopK (DESIGN.md section 5).

``f(x) = sigma(W_enc^T (x - b_dec * apply_b_dec_to_input) + b_enc)``, ``x_hat = W_dec^T f + b_dec``.
Weights use SAELens' orientation: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``. The SAE reads
the OUTPUT of 0-based decoder layer ``layer`` (hook point ``resid_post``), the same place a
steering vector at that layer acts.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from vsteer.kernels.sas_reference import sae_activate

__all__ = ["Activation", "SaeConfig", "SparseAutoencoder"]

Activation = Literal["relu", "jumprelu", "topk"]
ACTIVATIONS = ("relu", "jumprelu", "topk")
HOOKS = ("resid_post",)


@dataclass(frozen=True)
class SaeConfig:
    """What an SAE is and where it reads. Serialised as the JSON half of our format."""

    d_in: int
    d_sae: int
    activation: Activation = "relu"
    k: int | None = None  # TopK only
    layer: int | None = None  # decoder layer whose output it reads
    hook: str = "resid_post"
    model: str | None = None  # model name it was trained on
    apply_b_dec_to_input: bool = False
    name: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown SAE activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.activation == "topk":
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"a TopK SAE needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        elif self.k is not None:
            raise ValueError(f"k is only meaningful for a TopK SAE, not {self.activation}")
        if self.hook not in HOOKS:
            raise ValueError(f"unsupported SAE hook point {self.hook!r}; vsteer reads {HOOKS}")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SaeConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAE config keys {unknown}")
        return cls(**data)


class SparseAutoencoder(nn.Module):
    """An SAE with float32 (or any float dtype) parameters; a plain ``nn.Module`` so it trains.

    Example:
        >>> sae = SparseAutoencoder(SaeConfig(d_in=576, d_sae=4096, layer=15))
        >>> f = sae.encode(torch.randn(3, 576))
        >>> sae.decode(f).shape
        torch.Size([3, 576])
    """

    def __init__(self, config: SaeConfig, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        d, m = config.d_in, config.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d, m, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(m, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(m, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype))
        # JumpReLU thresholds (zeros elsewhere: a ReLU is a JumpReLU with threshold 0).
        self.threshold = nn.Parameter(torch.zeros(m, dtype=dtype), requires_grad=False)

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    @property
    def activation(self) -> str:
        return self.config.activation

    @property
    def layer(self) -> int | None:
        return self.config.layer

    def sha256(self) -> str:
        """Content hash of the weights and the config (names an SAE in provenance). Cached until
        a parameter changes in place."""
        params = [getattr(self, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")]
        stamp = tuple((id(p), p._version) for p in params)
        cached = self.__dict__.get("_sha_cache")
        if cached is not None and cached[0] == stamp:
            return cached[1]
        h = hashlib.sha256(repr(sorted((k, v) for k, v in self.config.to_json().items() if k not in ("name", "provenance"))).encode())
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            h.update(getattr(self, name).detach().float().cpu().contiguous().numpy().tobytes())
        self.__dict__["_sha_cache"] = (stamp, h.hexdigest())
        return self.__dict__["_sha_cache"][1]

    # ------------------------------------------------------------------ the maps
    def encoder_bias(self) -> torch.Tensor:
        """``b_enc`` with ``b_dec`` folded in, so ``pre = x @ W_enc + encoder_bias()``."""
        if self.config.apply_b_dec_to_input:
            return self.b_enc - self.b_dec @ self.W_enc
        return self.b_enc

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) @ self.W_enc + self.encoder_bias()

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """sigma: ReLU, JumpReLU (``relu(p) * (p > threshold)``) or TopK (top k of ``relu(p)``)."""
        return sae_activate(pre, self.config.activation, self.threshold, self.config.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``f(x)``, shape ``[..., d_sae]``."""
        return self.activate(self.pre_activation(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """``x - x_hat`` (the error term SAS keeps)."""
        return x.to(self.W_enc.dtype) - self(x)

    def sas(self, x: torch.Tensor, s: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Sparse activation steering with the error term kept (METHODS.md, SAS):
        ``x + W_dec^T (sigma(z + scale * s) - z)``, ``z = f(x)``. ``scale = 0`` returns ``x``."""
        z = self.encode(x)
        steered = self.activate(z + scale * s.to(z.dtype))
        return x.to(z.dtype) + (steered - z) @ self.W_dec

    def feature_direction(self, feature: int) -> torch.Tensor:
        """The decoder row of ``feature`` (what SAE feature steering adds)."""
        if not 0 <= feature < self.d_sae:
            raise IndexError(f"feature {feature} is out of range: this SAE has features 0..{self.d_sae - 1}")
        return self.W_dec[feature].detach().clone()
