"""The linear effect approximator of SAE-TS: ``y_hat = x M + b`` (Chalnev, Siu & Conmy 2024, sec. 4).

``x`` is a unit-norm steering direction ``[d_model]``, ``M`` is ``[d_model, d_sae]``, ``b`` is
``[d_sae]`` and ``y_hat`` predicts the direction's feature effect (SAE-TS eq. 2, measured at the
scale chosen for that direction). Two fits:

``fit_adam`` follows the reference training script, slavachalnev/SAE-TS
``src/sae_ts/ft_effects/train.py`` with ``LinearAdapter`` from ``src/sae_ts/ft_effects/utils.py``
(read through the fork sheikheddy/SAE-TS, and its development history in
slavachalnev/steering_research ``ft_effects/train.py``):

- only the inputs are normalised (``features / ||features||`` per row); the effects are used raw;
- ``W`` (our ``M``) starts from ``nn.init.kaiming_uniform_`` on a ``[d_model, d_sae]`` tensor.
  torch takes fan_in = size(1) = d_sae there, so entries are U(-sqrt(6/d_sae), sqrt(6/d_sae));
  ``b`` starts at zero;
- Adam (default betas, no weight decay), lr 2e-4, batches of 64 reshuffled every epoch (the last
  batch may be smaller), 15 epochs, ``CosineAnnealingLR(T_max=epochs)`` stepped once per EPOCH
  (so epoch e runs at ``lr * (1 + cos(pi e / epochs)) / 2``, down to 0);
- the loss is ``F.mse_loss(pred, y)``: the mean over batch AND features, so a single feature's
  error weighs 1/d_sae. No other term.
- the reference holds out the LAST 100 rows for validation; here the split is random
  (`train_test_split`), and the saved approximator is the one fit on the training rows.

``fit_least_squares`` is the closed form of the same objective (ordinary or ridge least squares
with an unpenalised bias), which the paper does not use; it is exact, deterministic and fast when
``d_model`` is moderate. It accumulates the normal equations over row chunks in float64, so it
never needs a float64 copy of ``Y``.

File format (``save``/``load``)::

    tensors   M   float32 [d_model, d_sae]
              b   float32 [d_sae]
    metadata  vsteer.approximator   JSON {"format_version": 1, "layer", "sae", "model",
                                          "d_model", "d_sae", "fit": {...}, "metrics": {...}}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _safetensors_bytes

from vsteer.effects.data import EffectsFileError, _atomic_write

__all__ = ["EffectApproximator", "train_test_split"]

METADATA_KEY = "vsteer.approximator"
FORMAT_VERSION = 1
_INT64 = struct.Struct("<q")


def train_test_split(n: int, test_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random disjoint ``(train_idx, test_idx)`` over ``range(n)``, each sorted.

    The test side gets ``round(n * test_fraction)`` rows, at least one when ``test_fraction > 0``
    and at most ``n - 1``.

    Example:
        >>> train, test = train_test_split(1000, 0.1, seed=0)
        >>> len(train), len(test)
        (900, 100)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = 0 if test_fraction == 0 else min(max(1, round(n * test_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _unit_rows(X: torch.Tensor) -> torch.Tensor:
    norms = X.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a direction (row of X) is all zeros and cannot be normalised")
    return X / norms


def _check_xy(X: torch.Tensor, Y: torch.Tensor) -> None:
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"expected X [N, d_model] and Y [N, d_sae] with N >= 1, got {tuple(X.shape)} and {tuple(Y.shape)}")
    if not (X.is_floating_point() and Y.is_floating_point()):
        raise ValueError(f"X and Y must be floating point, got {X.dtype} and {Y.dtype}")


class EffectApproximator:
    """``y_hat = x M + b``: predicts a unit-norm direction's effect on every SAE feature.

    Args:
        M: ``[d_model, d_sae]``; column ``j`` (``M[:, j]``, a ``d_model`` vector) is the direction
            whose predicted effect on feature ``j`` grows fastest.
        b: ``[d_sae]``, the predicted effect of the zero direction.
        layer: Decoder layer the effects were measured at.
        sae: Name of the SAE that measured them.
        model: Model name.
        meta: Extra JSON-serialisable information (fit settings, metrics).

    Example:
        >>> approx = EffectApproximator.fit_least_squares(data.X, data.Y, layer=data.layer, sae=data.sae)
        >>> approx.predict(data.X[:2]).shape
        torch.Size([2, 16384])
    """

    def __init__(
        self,
        M: torch.Tensor,
        b: torch.Tensor,
        *,
        layer: int | None = None,
        sae: str | None = None,
        model: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if M.ndim != 2 or b.ndim != 1 or b.shape[0] != M.shape[1]:
            raise ValueError(f"expected M [d_model, d_sae] and b [d_sae], got {tuple(M.shape)} and {tuple(b.shape)}")
        if not (bool(torch.isfinite(M).all()) and bool(torch.isfinite(b).all())):
            raise ValueError("M and b must be finite")
        self.M = M.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.b = b.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.layer = layer
        self.sae = sae
        self.model = model
        self.meta: dict[str, Any] = json.loads(json.dumps(dict(meta or {})))
        self._sha: str | None = None

    @property
    def d_model(self) -> int:
        return int(self.M.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.M.shape[1])

    @property
    def sha256(self) -> str:
        """Hex sha256 of the numbers (shape as two int64, then M and b as float32 LE)."""
        if self._sha is None:
            h = hashlib.sha256(_INT64.pack(self.d_model) + _INT64.pack(self.d_sae))
            h.update(self.M.numpy().astype("<f4", copy=False).tobytes())
            h.update(self.b.numpy().astype("<f4", copy=False).tobytes())
            self._sha = h.hexdigest()
        return self._sha

    def info(self) -> dict[str, Any]:
        """Provenance record: sha256, layer, SAE, model, shape, fit method."""
        return {
            "sha256": self.sha256,
            "layer": self.layer,
            "sae": self.sae,
            "model": self.model,
            "d_model": self.d_model,
            "d_sae": self.d_sae,
            "fit": self.meta.get("fit", {}).get("method"),
        }

    def __repr__(self) -> str:
        return (
            f"EffectApproximator(d_model={self.d_model}, d_sae={self.d_sae}, layer={self.layer}, "
            f"sae={self.sae!r}, model={self.model!r}, sha256={self.sha256[:12]}...)"
        )

    # ------------------------------------------------------------------ use

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x M + b`` for ``x`` of shape ``[..., d_model]`` (not normalised here: pass unit-norm
        directions, as in training). Returns float32 on ``x``'s device."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must end in d_model={self.d_model}, got shape {tuple(x.shape)}")
        M, b = self.M.to(x.device), self.b.to(x.device)
        return x.to(torch.float32) @ M + b

    @torch.no_grad()
    def evaluate(
        self, X: torch.Tensor, Y: torch.Tensor, *, k: int = 10, normalize: bool = True, chunk_size: int = 1024
    ) -> dict[str, float]:
        """Held-out fit quality.

        Returns:
            ``mse`` (mean over rows and features), ``r2`` (fraction of variance explained:
            ``1 - SS_res / SS_tot``, ``SS_tot`` about the per-feature mean of ``Y``), ``cosine``
            (mean over rows of cos(y_hat, y)), ``cosine_centered`` (the same after subtracting
            the per-feature mean of ``Y`` from both: the bias alone scores ~0 here, while it can
            score high on ``cosine``), ``topk_overlap`` (mean over rows of
            ``|top-k(y_hat) & top-k(y)| / k``, largest values), ``k`` and ``n``.

        Args:
            X: ``[N, d_model]`` directions (unit-normalised first when ``normalize``).
            Y: ``[N, d_sae]`` measured effects.
            k: Features compared by ``topk_overlap``.
        """
        _check_xy(X, Y)
        if X.shape[1] != self.d_model or Y.shape[1] != self.d_sae:
            raise ValueError(f"shapes {tuple(X.shape)}, {tuple(Y.shape)} do not fit d_model={self.d_model}, d_sae={self.d_sae}")
        k = max(1, min(int(k), self.d_sae))
        n = X.shape[0]
        mean = Y.to(torch.float64).mean(dim=0)
        sse = sst = cos = cos_c = overlap = 0.0
        for start in range(0, n, chunk_size):
            x = X[start:start + chunk_size].to(torch.float32)
            x = _unit_rows(x) if normalize else x
            y = Y[start:start + chunk_size].to(torch.float64)
            pred = self.predict(x).to(torch.float64)
            sse += float(((pred - y) ** 2).sum())
            sst += float(((y - mean) ** 2).sum())
            cos += float(F.cosine_similarity(pred, y, dim=1, eps=1e-12).sum())
            cos_c += float(F.cosine_similarity(pred - mean, y - mean, dim=1, eps=1e-12).sum())
            top_p = pred.topk(k, dim=1).indices
            top_y = y.topk(k, dim=1).indices
            hits = (top_p.unsqueeze(2) == top_y.unsqueeze(1)).any(dim=2).sum(dim=1)
            overlap += float(hits.sum()) / k
        return {
            "mse": sse / (n * self.d_sae),
            "r2": 1.0 - sse / sst if sst > 0 else float("nan"),
            "cosine": cos / n,
            "cosine_centered": cos_c / n,
            "topk_overlap": overlap / n,
            "k": k,
            "n": n,
        }

    # ------------------------------------------------------------------ fits

    @classmethod
    def fit_adam(
        cls,
        X: torch.Tensor,
        Y: torch.Tensor,
        *,
        lr: float = 2e-4,
        epochs: int = 15,
        batch_size: int = 64,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: bool = True,
        layer: int | None = None,
        sae: str | None = None,
        model: str | None = None,
    ) -> EffectApproximator:
        """Fit by minibatch Adam on the MSE, as the SAE-TS reference does (module docstring).

        Args:
            X: ``[N, d_model]`` directions; each row is normalised to unit norm first.
            Y: ``[N, d_sae]`` effects, used as they are.
            lr: Peak learning rate (cosine-annealed to 0 over ``epochs``, stepped per epoch).
            epochs: Passes over the data.
            batch_size: Rows per Adam step.
            seed: Seeds the initialisation and the shuffling.
            device: Where to train (``"cuda"`` for SAE-sized problems).
            progress: Show a tqdm bar over epochs.
            layer, sae, model: Recorded with the result.

        Returns:
            The fitted approximator (on the CPU); ``meta["fit"]`` holds the settings and the
            mean training loss of every epoch.
        """
        from tqdm.auto import tqdm

        _check_xy(X, Y)
        if epochs < 1 or batch_size < 1 or not lr > 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
        device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        d_model, d_sae = X.shape[1], Y.shape[1]
        X = _unit_rows(X.to(torch.float32))
        Y = Y.to(torch.float32)
        # nn.init.kaiming_uniform_(torch.empty(d_model, d_sae)): a=0 -> gain sqrt(2); fan_in = size(1).
        bound = math.sqrt(2.0) * math.sqrt(3.0 / d_sae)
        M = ((torch.rand(d_model, d_sae, generator=gen) * 2 - 1) * bound).to(device).requires_grad_()
        b = torch.zeros(d_sae, device=device, requires_grad=True)
        opt = torch.optim.Adam([M, b], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        history: list[float] = []
        n = X.shape[0]
        bar = tqdm(range(epochs), desc="fit effects approximator", disable=not progress, leave=False)
        for _ in bar:
            perm = torch.randperm(n, generator=gen)
            total, batches = 0.0, 0
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                xb, yb = X[idx].to(device), Y[idx].to(device)
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(xb @ M + b, yb)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                batches += 1
            sched.step()
            history.append(total / batches)
            bar.set_postfix(loss=f"{history[-1]:.4g}")
        fit = {
            "method": "adam", "lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed,
            "schedule": "cosine-per-epoch", "init": "kaiming_uniform", "loss": "mse_mean", "n_train": n,
            "train_loss": history,
        }
        return cls(M.detach(), b.detach(), layer=layer, sae=sae, model=model, meta={"fit": fit})

    @classmethod
    @torch.no_grad()
    def fit_least_squares(
        cls,
        X: torch.Tensor,
        Y: torch.Tensor,
        ridge: float = 0.0,
        *,
        chunk_size: int = 4096,
        layer: int | None = None,
        sae: str | None = None,
        model: str | None = None,
    ) -> EffectApproximator:
        """Closed form: ``argmin_{M,b} sum_i ||x_i M + b - y_i||^2 + ridge ||M||_F^2`` (b not
        penalised), with ``x_i`` unit-normalised first.

        With centred data ``Xc``, ``Yc``: ``M = (Xc^T Xc + ridge I)^+ Xc^T Yc`` and
        ``b = mean(Y) - mean(X) M``. With ``ridge = 0`` and fewer independent rows than
        ``d_model`` the pseudo-inverse picks the minimum-norm ``M``.
        """
        _check_xy(X, Y)
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        n, d_model = X.shape
        d_sae = Y.shape[1]
        x_mean = torch.zeros(d_model, dtype=torch.float64)
        y_mean = torch.zeros(d_sae, dtype=torch.float64)
        for start in range(0, n, chunk_size):
            x_mean += _unit_rows(X[start:start + chunk_size].to(torch.float64)).sum(dim=0)
            y_mean += Y[start:start + chunk_size].to(torch.float64).sum(dim=0)
        x_mean /= n
        y_mean /= n
        gram = torch.zeros(d_model, d_model, dtype=torch.float64)
        cross = torch.zeros(d_model, d_sae, dtype=torch.float64)
        for start in range(0, n, chunk_size):
            xc = _unit_rows(X[start:start + chunk_size].to(torch.float64)) - x_mean
            gram += xc.T @ xc
            cross += xc.T @ (Y[start:start + chunk_size].to(torch.float64) - y_mean)
        gram += ridge * torch.eye(d_model, dtype=torch.float64)
        # Symmetric pseudo-inverse (eigh) so a rank-deficient Gram matrix gives the min-norm M.
        evals, evecs = torch.linalg.eigh(gram)
        tol = float(evals.abs().max()) * d_model * torch.finfo(torch.float64).eps
        inv = torch.where(evals > tol, 1.0 / evals.clamp_min(tol), torch.zeros_like(evals))
        M = evecs @ (inv.unsqueeze(1) * (evecs.T @ cross))
        b = y_mean - x_mean @ M
        fit = {"method": "lstsq", "ridge": ridge, "n_train": n, "rank": int((evals > tol).sum())}
        return cls(M, b, layer=layer, sae=sae, model=model, meta={"fit": fit})

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``M``, ``b`` and the metadata to a safetensors file, atomically; return its path."""
        path = Path(path).expanduser()
        header = {
            **self.meta, "format_version": FORMAT_VERSION, "layer": self.layer, "sae": self.sae, "model": self.model,
            "d_model": self.d_model, "d_sae": self.d_sae,
        }
        data = _safetensors_bytes({"M": self.M, "b": self.b}, {METADATA_KEY: json.dumps(header, sort_keys=True)})
        _atomic_write(path, data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EffectApproximator:
        """Read a file written by `save`.

        Raises:
            EffectsFileError: Missing file, not safetensors, no ``vsteer.approximator`` metadata,
                a newer format, or tensors that are missing, misshapen or not finite.
        """
        where = str(Path(path).expanduser())
        if not os.path.isfile(where):
            raise EffectsFileError("no such approximator file", path=where)
        try:
            with safe_open(where, framework="pt", device="cpu") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
                if raw is None:
                    raise EffectsFileError("not an approximator file: no vsteer.approximator metadata", path=where, key=METADATA_KEY)
                keys = set(f.keys())
                if not {"M", "b"} <= keys:
                    raise EffectsFileError(f"needs tensors 'M' and 'b', has {sorted(keys)}", path=where, key="M")
                M, b = f.get_tensor("M"), f.get_tensor("b")
        except SafetensorError as exc:
            raise EffectsFileError(f"not a safetensors file: {exc}", path=where) from exc
        try:
            header = json.loads(raw)
        except ValueError as exc:
            raise EffectsFileError(f"metadata is not JSON: {exc}", path=where, key=METADATA_KEY) from exc
        if not isinstance(header, dict) or header.get("format_version", 0) > FORMAT_VERSION:
            raise EffectsFileError(f"unsupported metadata (this vsteer reads format_version <= {FORMAT_VERSION})",
                                   path=where, key=METADATA_KEY)
        for key, actual in (("d_model", M.shape[0] if M.ndim == 2 else None), ("d_sae", b.shape[0] if b.ndim == 1 else None)):
            if key in header and header[key] != actual:
                raise EffectsFileError(f"metadata says {key}={header[key]} but the tensors have {actual}", path=where, key=key)
        meta = {k: v for k, v in header.items() if k not in ("format_version", "layer", "sae", "model", "d_model", "d_sae")}
        try:
            return cls(M, b, layer=header.get("layer"), sae=header.get("sae"), model=header.get("model"), meta=meta)
        except ValueError as exc:
            raise EffectsFileError(str(exc), path=where, key="M") from exc
