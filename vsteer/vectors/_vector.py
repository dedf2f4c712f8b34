"""`SteeringVector`: an immutable map from decoder layer to a direction in the residual stream.

Layer ``L`` means the OUTPUT of 0-based decoder layer ``L`` (DESIGN.md section 2). Vectors are
value objects: every operation (``to``, arithmetic, ``normalized``, ``normalize_layers``) returns a
new vector and never changes the tensors of an existing one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import operator
import struct
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import torch

__all__ = ["SteeringVector"]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]

# The sha256 preimage is fixed-width: an int64 hidden size, then per layer an int64 layer index
# followed by exactly hidden_size float32 values, all little-endian. Fixed widths make the
# encoding unambiguous without separators.
_INT64 = struct.Struct("<q")

_REPR_MAX_LAYERS = 8


class SteeringVector:
    """Per-layer steering directions for one model, compared and hashed by their numbers.

    Tensors are 1-D float32 on the CPU unless ``to()`` moved or cast them; all layers share one
    dtype and device. Layer keys are sorted ascending. A negative key counts from the end (as in
    Python indexing and repeng); such a vector must go through ``normalize_layers(num_layers)``
    before it can be written to a file or applied.

    Args:
        layers: Map from layer to a 1-D tensor of length ``hidden_size``. Non-tensor values and
            integer tensors are converted to float32 CPU tensors; the tensors are copied.
        hidden_size: Length of every tensor (the model's hidden size).
        model: Name of the model the vector was made for (e.g. ``"SmolLM2-135M-Instruct"``).
        method: How the vector was computed (``"caa"``, ``"pca"``, ``"custom"``...).
        provenance: JSON-serialisable description of how the vector was made.

    Raises:
        ValueError: No layers, a tensor that is not 1-D of length ``hidden_size``, a NaN/Inf
            value (the message names the layer), or provenance that is not JSON.

    Example:
        >>> v = SteeringVector({10: torch.ones(4)}, hidden_size=4, model="SmolLM2-135M-Instruct")
        >>> (2 * v).norms()
        {10: 4.0}
    """

    __slots__ = ("_layers", "_hidden_size", "_model", "_method", "_provenance", "_sha256")

    def __init__(
        self,
        layers: Mapping[int, ArrayLike],
        hidden_size: int,
        model: str | None = None,
        method: str = "custom",
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        hidden_size = _as_int(hidden_size, "hidden_size")
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size}")
        if model is not None and not isinstance(model, str):
            raise ValueError(f"model must be a string or None, got {type(model).__name__}")
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty string, got {method!r}")
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError("a steering vector needs at least one layer")

        checked: dict[int, torch.Tensor] = {}
        dtype = device = None
        shape = None
        for key in layers:
            layer = _as_int(key, "layer key")
            if layer in checked:
                raise ValueError(f"layer {layer}: given twice")
            tensor = _as_tensor(layers[key], layer)
            if tensor.ndim not in (1, 2) or tensor.shape[-1] != hidden_size or 0 in tensor.shape:
                raise ValueError(
                    f"layer {layer}: expected a tensor of shape [hidden_size={hidden_size}] (or "
                    f"[positions, {hidden_size}] for a per-position vector), got shape {tuple(tensor.shape)}"
                )
            if shape is None:
                shape = tuple(tensor.shape)
            elif tuple(tensor.shape) != shape:
                raise ValueError(
                    f"layer {layer}: shape {tuple(tensor.shape)} differs from the other layers ({shape})"
                )
            if dtype is None:
                dtype, device = tensor.dtype, tensor.device
            elif tensor.dtype != dtype or tensor.device != device:
                raise ValueError(
                    f"layer {layer}: dtype/device {tensor.dtype}/{tensor.device} differs from the "
                    f"other layers ({dtype}/{device})"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"layer {layer}: contains NaN or Inf values")
            checked[layer] = tensor.detach().clone().contiguous()

        prov = {} if provenance is None else provenance
        if not isinstance(prov, Mapping):
            raise ValueError(f"provenance must be a mapping, got {type(prov).__name__}")
        try:
            # A JSON round trip both checks serialisability and takes a private deep copy.
            prov = json.loads(json.dumps(dict(prov)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"provenance is not JSON-serialisable: {exc}") from exc

        set_ = object.__setattr__
        set_(self, "_layers", dict(sorted(checked.items())))
        set_(self, "_hidden_size", hidden_size)
        set_(self, "_model", model)
        set_(self, "_method", method)
        set_(self, "_provenance", prov)
        set_(self, "_sha256", None)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_tensors(
        cls,
        layers: Mapping[int, ArrayLike],
        *,
        model: str | None = None,
        method: str = "custom",
        provenance: Mapping[str, Any] | None = None,
    ) -> SteeringVector:
        """Build a float32 CPU vector from tensors, arrays or lists, inferring ``hidden_size``.

        Args:
            layers: Map from layer to a 1-D tensor, NumPy array or list of floats.
            model: Name of the model the vector was made for.
            method: How the vector was computed.
            provenance: JSON-serialisable description of how the vector was made.

        Returns:
            A new vector whose tensors are float32 on the CPU.

        Raises:
            ValueError: As for the constructor.

        Example:
            >>> v = SteeringVector.from_tensors({3: [1.0, 0.0]}, model="m", method="caa")
            >>> v.hidden_size, v.layer_indices
            (2, [3])
        """
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError("a steering vector needs at least one layer")
        converted = {
            key: _as_tensor(value, key).detach().to(device="cpu", dtype=torch.float32)
            for key, value in layers.items()
        }
        first_key = min(converted, key=lambda k: _as_int(k, "layer key"))
        first = converted[first_key]
        if first.ndim not in (1, 2):
            raise ValueError(
                f"layer {first_key}: expected a 1-D tensor (or 2-D per-position), got shape {tuple(first.shape)}"
            )
        return cls(converted, first.shape[-1], model=model, method=method, provenance=provenance)

    # ------------------------------------------------------------------ fields

    @property
    def layers(self) -> Mapping[int, torch.Tensor]:
        """Read-only map from layer to its 1-D tensor, keys ascending. Do not modify the tensors."""
        return MappingProxyType(self._layers)

    @property
    def hidden_size(self) -> int:
        """Length of every layer's tensor."""
        return self._hidden_size

    @property
    def model(self) -> str | None:
        """Name of the model the vector was made for, if known."""
        return self._model

    @property
    def method(self) -> str:
        """How the vector was computed."""
        return self._method

    @property
    def provenance(self) -> dict[str, Any]:
        """A copy of the JSON-serialisable record of how the vector was made."""
        return copy.deepcopy(self._provenance)

    @property
    def layer_indices(self) -> list[int]:
        """The layers, ascending."""
        return list(self._layers)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype shared by all layers."""
        return next(iter(self._layers.values())).dtype

    @property
    def device(self) -> torch.device:
        """The device shared by all layers."""
        return next(iter(self._layers.values())).device

    @property
    def num_positions(self) -> int | None:
        """For a per-position vector (tensors ``[n, hidden]``, e.g. ActAdd), n; else None.

        Row p of a per-position vector is added at absolute prompt position p (front-aligned).
        """
        first = next(iter(self._layers.values()))
        return int(first.shape[0]) if first.ndim == 2 else None

    @property
    def sha256(self) -> str:
        """Hex sha256 of the numbers: hidden size, then each layer's index and float32 LE bytes.

        The model name, method and provenance are not hashed, so the same numbers always get the
        same hash.
        """
        if self._sha256 is None:
            digest = hashlib.sha256(_INT64.pack(self._hidden_size))
            if self.num_positions is not None:  # 1-D vectors keep the hashes they always had
                digest.update(b"positions" + _INT64.pack(self.num_positions))
            for layer, tensor in self._layers.items():
                digest.update(_INT64.pack(layer))
                digest.update(_le_float32_bytes(tensor))
            object.__setattr__(self, "_sha256", digest.hexdigest())
        return self._sha256  # type: ignore[return-value]

    # ------------------------------------------------------------------ transforms

    def replace(self, **changes: Any) -> SteeringVector:
        """Return a copy with some of ``layers``, ``hidden_size``, ``model``, ``method``,
        ``provenance`` replaced.

        Example:
            >>> SteeringVector.from_tensors({0: [1.0]}).replace(model="gpt2").model
            'gpt2'
        """
        fields = {
            "layers": self._layers,
            "hidden_size": self._hidden_size,
            "model": self._model,
            "method": self._method,
            "provenance": self._provenance,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"replace() got unknown fields {sorted(unknown)}; allowed: {sorted(fields)}")
        fields.update(changes)
        return SteeringVector(**fields)

    def to(
        self,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> SteeringVector:
        """Return a copy whose tensors have the given dtype and/or device.

        Args:
            dtype: A floating-point dtype, or None to keep the current one.
            device: Target device, or None to keep the current one.

        Example:
            >>> SteeringVector.from_tensors({0: [1.0]}).to(dtype=torch.float16).dtype
            torch.float16
        """
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        layers = {layer: t.to(device=device, dtype=dtype) for layer, t in self._layers.items()}
        return self.replace(layers=layers)

    def select_layers(self, layers: Iterable[int]) -> SteeringVector:
        """Return a copy holding only ``layers`` (each must be present).

        Example:
            >>> SteeringVector.from_tensors({2: [1.0], 3: [2.0]}).select_layers([3]).layer_indices
            [3]
        """
        wanted = [_as_int(layer, "layer") for layer in layers]
        missing = sorted(set(wanted) - set(self._layers))
        if missing:
            raise ValueError(f"layers {missing} are not in this vector (it has {sorted(self._layers)})")
        if not wanted:
            raise ValueError("select_layers needs at least one layer")
        return self.replace(layers={layer: self._layers[layer] for layer in sorted(set(wanted))})

    def norms(self) -> dict[int, float]:
        """Return the L2 norm of each layer's tensor.

        Example:
            >>> SteeringVector.from_tensors({2: [3.0, 4.0]}).norms()
            {2: 5.0}
        """
        return {layer: float(t.double().norm()) for layer, t in self._layers.items()}

    def normalized(self) -> SteeringVector:
        """Return a copy with every layer scaled to unit L2 norm.

        Raises:
            ValueError: A layer is all zeros (the message names it).

        Example:
            >>> SteeringVector.from_tensors({2: [3.0, 4.0]}).normalized().layers[2].tolist()
            [0.6000000238418579, 0.800000011920929]
        """
        layers = {}
        for layer, t in self._layers.items():
            norm = t.double().norm()
            if float(norm) == 0.0:
                raise ValueError(f"layer {layer}: cannot normalise an all-zero tensor")
            layers[layer] = (t.double() / norm).to(t.dtype)
        return self.replace(layers=layers, provenance=_op("normalize", [self]))

    def normalize_layers(self, num_layers: int) -> SteeringVector:
        """Return a copy where each negative layer ``L`` becomes ``num_layers + L``.

        Args:
            num_layers: Number of decoder layers of the model.

        Raises:
            ValueError: A layer falls outside ``[0, num_layers)`` or two keys name the same layer.

        Example:
            >>> SteeringVector.from_tensors({-1: [1.0]}).normalize_layers(30).layer_indices
            [29]
        """
        num_layers = _as_int(num_layers, "num_layers")
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        layers: dict[int, torch.Tensor] = {}
        for layer, t in self._layers.items():
            resolved = layer + num_layers if layer < 0 else layer
            if not 0 <= resolved < num_layers:
                raise ValueError(
                    f"layer {layer} is out of range for a model with {num_layers} layers "
                    f"(allowed: {-num_layers}..{num_layers - 1})"
                )
            if resolved in layers:
                raise ValueError(f"layer {layer} and layer {resolved} name the same layer")
            layers[resolved] = t
        return self.replace(layers=layers)

    # ------------------------------------------------------------------ arithmetic

    def __add__(self, other: object) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self._combine(other, 1.0, "add")

    def __sub__(self, other: object) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self._combine(other, -1.0, "sub")

    def __neg__(self) -> SteeringVector:
        layers = {layer: -t for layer, t in self._layers.items()}
        return self.replace(layers=layers, provenance=_op("neg", [self]))

    def __mul__(self, scale: object) -> SteeringVector:
        value = _as_scalar(scale)
        if value is None:
            return NotImplemented
        layers = {layer: t * value for layer, t in self._layers.items()}
        return self.replace(layers=layers, provenance=_op("mul", [self], scale=value))

    __rmul__ = __mul__

    def __truediv__(self, divisor: object) -> SteeringVector:
        value = _as_scalar(divisor)
        if value is None:
            return NotImplemented
        if value == 0.0:
            raise ZeroDivisionError("cannot divide a steering vector by zero")
        layers = {layer: t / value for layer, t in self._layers.items()}
        return self.replace(layers=layers, provenance=_op("div", [self], divisor=value))

    def _combine(self, other: SteeringVector, sign: float, op: str) -> SteeringVector:
        if other._hidden_size != self._hidden_size:
            raise ValueError(
                f"cannot {op} vectors of different hidden sizes "
                f"({self._hidden_size} and {other._hidden_size})"
            )
        if self._model is not None and other._model is not None and self._model != other._model:
            raise ValueError(
                f"cannot {op} vectors of different models ({self._model!r} and {other._model!r})"
            )
        like = next(iter(self._layers.values()))
        layers: dict[int, torch.Tensor] = dict(self._layers)
        for layer, t in other._layers.items():
            t = t.to(device=like.device, dtype=like.dtype)
            if layer in layers:
                layers[layer] = layers[layer] + t if sign > 0 else layers[layer] - t
            else:
                # A layer missing from one side counts as zeros.
                layers[layer] = t if sign > 0 else -t
        return SteeringVector(
            layers,
            self._hidden_size,
            model=self._model if self._model is not None else other._model,
            method=self._method if self._method == other._method else "custom",
            provenance=_op(op, [self, other]),
        )

    # ------------------------------------------------------------------ protocol

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self is other or (self.sha256 == other.sha256 and self._model == other._model)

    def __hash__(self) -> int:
        return hash((self.sha256, self._model))

    def __repr__(self) -> str:
        layers = self.layer_indices
        shown = ", ".join(str(layer) for layer in layers[:_REPR_MAX_LAYERS])
        if len(layers) > _REPR_MAX_LAYERS:
            shown += f", ... ({len(layers)} layers)"
        return (
            f"SteeringVector(model={self._model!r}, method={self._method!r}, "
            f"hidden_size={self._hidden_size}, layers=[{shown}], sha256={self.sha256[:12]}...)"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"SteeringVector is immutable; use replace() to change {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("SteeringVector is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling (e.g. by Ray) rebuilds through the validating constructor.
        return (
            SteeringVector,
            (self._layers, self._hidden_size, self._model, self._method, self._provenance),
        )


# ---------------------------------------------------------------------- helpers


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _as_tensor(value: Any, layer: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"layer {layer}: cannot convert {type(value).__name__} to a tensor: {exc}"
            ) from exc
    if not tensor.is_floating_point():
        if tensor.is_complex():
            raise ValueError(f"layer {layer}: complex tensors are not supported")
        tensor = tensor.to(torch.float32)
    return tensor


def _as_scalar(value: object) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"scale must be finite, got {result}")
    return result


def _le_float32_bytes(tensor: torch.Tensor) -> bytes:
    array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    return array.astype("<f4", copy=False).tobytes()


def _op(name: str, inputs: Iterable[SteeringVector], **params: Any) -> dict[str, Any]:
    return {"op": name, "inputs": [v.sha256 for v in inputs], **params}
