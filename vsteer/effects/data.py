"""The feature-effects file shared by the measuring code and the approximator (DESIGN.md section 6).

One measurement run ends in ``<folder>/effects.safetensors``. Row ``i`` of both tensors belongs to
steering vector ``i``::

    tensors   directions   float32 [N, d_model]   the steered direction x_i (unit norm; the scale
                                                 it was added at is in ``scales``)
              effects      float32 [N, d_sae]     y_i = E_steered[f(h)] - E_unsteered[f(h)]
                                                 (SAE-TS eq. 2: mean SAE activation over every
                                                 token of the steered rollouts minus the same over
                                                 the unsteered rollouts)
              scales       float32 [N]            optional: the scale each x_i was added at
    metadata  vsteer.effects   JSON object:
              {"format_version": 1,      # required, <= 1
               "layer": 12,              # required: decoder layer steered and read by the SAE
               "sae": "gemma-l12",       # required: name (or path) of the SAE measuring y
               "model": "gemma-2-2b",    # required key, may be null
               "d_model": 2304, "d_sae": 16384, "n": 50000,   # written; checked when present
               ...}                      # anything else (rollout settings, seeds) is kept as is

Directions need not be exactly unit norm on disk: the approximator normalises them, as the
reference does (``features / torch.norm(features, dim=-1, keepdim=True)`` in SAE-TS
``ft_effects/train.py``). They must be finite and non-zero.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _safetensors_bytes

from vsteer._errors import VsteerError

__all__ = ["EFFECTS_FILE", "METADATA_KEY", "EffectData", "EffectsFileError", "load_effects", "save_effects"]

#: File name inside an effects folder.
EFFECTS_FILE = "effects.safetensors"
#: safetensors metadata key holding the JSON description.
METADATA_KEY = "vsteer.effects"
FORMAT_VERSION = 1

_REQUIRED_META = ("layer", "sae", "model")


class EffectsFileError(VsteerError, ValueError):
    """An effects or approximator file cannot be read or written, or its contents do not fit
    together; ``path`` and ``key`` say where."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        where = ", ".join(p for p in (f"path={path}" if path else "", f"key={key}" if key else "") if p)
        super().__init__(f"{message} ({where})" if where else message)


@dataclass(frozen=True)
class EffectData:
    """Measured feature effects: ``X [N, d_model]`` directions, ``Y [N, d_sae]`` effects.

    Attributes:
        X: The steered directions, float32.
        Y: Their effects on the SAE's features, float32.
        layer: Decoder layer that was steered (and that the SAE reads).
        sae: Name or path of the measuring SAE.
        model: Model name, if known.
        meta: The whole JSON metadata (including the keys above and any extra ones).
        scales: The scale each direction was added at, float32 ``[N]``, if recorded.
    """

    X: torch.Tensor
    Y: torch.Tensor
    layer: int
    sae: str
    model: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    scales: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.X.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.Y.shape[1])


def _effects_path(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder).expanduser()
    return path if path.suffix == ".safetensors" else path / EFFECTS_FILE


def _check_meta(meta: Mapping[str, Any], path: str) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise EffectsFileError(f"metadata must be a JSON object, got {type(meta).__name__}", path=path, key=METADATA_KEY)
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise EffectsFileError(f"metadata lacks {missing} (needs {list(_REQUIRED_META)})", path=path, key=METADATA_KEY)
    layer = meta["layer"]
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise EffectsFileError(f"metadata 'layer' must be an integer >= 0, got {layer!r}", path=path, key="layer")
    if not isinstance(meta["sae"], str) or not meta["sae"]:
        raise EffectsFileError(f"metadata 'sae' must be a non-empty string, got {meta['sae']!r}", path=path, key="sae")
    if meta["model"] is not None and not isinstance(meta["model"], str):
        raise EffectsFileError(f"metadata 'model' must be a string or null, got {meta['model']!r}", path=path, key="model")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EffectsFileError(
            f"format_version {version!r} is newer than this vsteer reads ({FORMAT_VERSION})", path=path, key="format_version"
        )
    return dict(meta)


def _check_tensors(
    X: torch.Tensor, Y: torch.Tensor, scales: torch.Tensor | None, path: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    for name, t, ndim in (("directions", X, 2), ("effects", Y, 2)):
        if not isinstance(t, torch.Tensor):
            raise EffectsFileError(f"{name} must be a tensor, got {type(t).__name__}", path=path, key=name)
        if t.ndim != ndim or 0 in t.shape:
            raise EffectsFileError(f"{name} must be a non-empty 2-D tensor, got shape {tuple(t.shape)}", path=path, key=name)
        if not t.is_floating_point():
            raise EffectsFileError(f"{name} must be floating point, got {t.dtype}", path=path, key=name)
    if X.shape[0] != Y.shape[0]:
        raise EffectsFileError(
            f"directions has {X.shape[0]} rows but effects has {Y.shape[0]}", path=path, key="effects"
        )
    X = X.detach().to(device="cpu", dtype=torch.float32).contiguous()
    Y = Y.detach().to(device="cpu", dtype=torch.float32).contiguous()
    for name, t in (("directions", X), ("effects", Y)):
        if not bool(torch.isfinite(t).all()):
            raise EffectsFileError(f"{name} contains NaN or Inf values", path=path, key=name)
    zero = (X.norm(dim=1) == 0).nonzero().flatten()
    if zero.numel():
        raise EffectsFileError(f"direction rows {zero[:5].tolist()} are all zeros", path=path, key="directions")
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or scales.ndim != 1 or scales.shape[0] != X.shape[0]:
            shape = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise EffectsFileError(f"scales must be a 1-D tensor of length {X.shape[0]}, got {shape}", path=path, key="scales")
        scales = scales.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(scales).all()):
            raise EffectsFileError("scales contains NaN or Inf values", path=path, key="scales")
    return X, Y, scales


def save_effects(
    folder: str | os.PathLike[str],
    X: torch.Tensor,
    Y: torch.Tensor,
    meta: Mapping[str, Any],
    *,
    scales: torch.Tensor | None = None,
) -> Path:
    """Write ``<folder>/effects.safetensors`` atomically (temporary file + rename); return its path.

    Args:
        folder: The folder (created if missing), or a path ending in ``.safetensors``.
        X: Directions ``[N, d_model]``.
        Y: Effects ``[N, d_sae]``.
        meta: JSON object with at least ``layer``, ``sae`` and ``model`` (may be None); other keys
            are kept. ``format_version``, ``d_model``, ``d_sae`` and ``n`` are filled in.
        scales: Optional ``[N]`` scales the directions were added at.

    Raises:
        EffectsFileError: Bad shapes, non-finite values, a zero direction, incomplete or
            non-JSON metadata, or a write failure.

    Example:
        >>> save_effects("runs/l12", X, Y, {"layer": 12, "sae": "gemma-l12", "model": "gemma-2-2b"})
    """
    path = _effects_path(folder)
    where = str(path)
    meta = _check_meta(meta, where)
    X, Y, scales = _check_tensors(X, Y, scales, where)
    meta.update(format_version=FORMAT_VERSION, d_model=int(X.shape[1]), d_sae=int(Y.shape[1]), n=int(X.shape[0]))
    try:
        text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise EffectsFileError(f"metadata is not JSON-serialisable: {exc}", path=where, key=METADATA_KEY) from exc
    tensors = {"directions": X, "effects": Y}
    if scales is not None:
        tensors["scales"] = scales
    data = _safetensors_bytes(tensors, {METADATA_KEY: text})
    _atomic_write(path, data)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise EffectsFileError(f"cannot write to {path.parent}: {exc}", path=str(path)) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise EffectsFileError(f"cannot write the file: {exc}", path=str(path)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_effects(folder: str | os.PathLike[str]) -> EffectData:
    """Read ``<folder>/effects.safetensors`` (or the ``.safetensors`` file given).

    Raises:
        EffectsFileError: Missing file, not safetensors, no or bad ``vsteer.effects`` metadata,
            missing or misshapen tensors, or non-finite values; ``key`` names the culprit.

    Example:
        >>> data = load_effects("runs/l12")
        >>> data.X.shape, data.Y.shape, data.layer
        (torch.Size([50000, 2304]), torch.Size([50000, 16384]), 12)
    """
    path = _effects_path(folder)
    where = str(path)
    if not path.is_file():
        raise EffectsFileError(f"no {EFFECTS_FILE} here", path=where)
    try:
        with safe_open(where, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            if raw is None:
                raise EffectsFileError("not an effects file: no vsteer.effects metadata", path=where, key=METADATA_KEY)
            try:
                meta = json.loads(raw)
            except ValueError as exc:
                raise EffectsFileError(f"vsteer.effects metadata is not JSON: {exc}", path=where, key=METADATA_KEY) from exc
            meta = _check_meta(meta, where)
            keys = set(f.keys())
            for name in ("directions", "effects"):
                if name not in keys:
                    raise EffectsFileError(f"missing tensor {name!r} (has {sorted(keys)})", path=where, key=name)
            X, Y = f.get_tensor("directions"), f.get_tensor("effects")
            scales = f.get_tensor("scales") if "scales" in keys else None
    except SafetensorError as exc:
        raise EffectsFileError(f"not a safetensors file: {exc}", path=where) from exc
    X, Y, scales = _check_tensors(X, Y, scales, where)
    for key, actual in (("d_model", X.shape[1]), ("d_sae", Y.shape[1]), ("n", X.shape[0])):
        if key in meta and meta[key] != actual:
            raise EffectsFileError(f"metadata says {key}={meta[key]} but the tensors have {actual}", path=where, key=key)
    return EffectData(X=X, Y=Y, layer=meta["layer"], sae=meta["sae"], model=meta["model"], meta=meta, scales=scales)
