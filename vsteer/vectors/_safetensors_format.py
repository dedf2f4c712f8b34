"""vsteer's own vector file: safetensors with one tensor per layer (DESIGN.md section 3).

Layout::

    tensors   layer.<L>   float32, shape [hidden]      one per layer, L >= 0
                          (or [positions, hidden] for a per-position vector such as ActAdd's)
    metadata  vsteer.format_version   "1"
              vsteer.model            '{"name": <str|null>, "hidden_size": <int>}'
              vsteer.method           e.g. "caa"
              vsteer.provenance       JSON object

A file with no ``vsteer.*`` metadata is still read when every tensor is a 1-D ``layer.<L>``: other
tools write that layout. Such a vector has no model name, method ``"custom"`` and no provenance.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

from vsteer._errors import VectorFileError
from vsteer.vectors._vector import SteeringVector

__all__ = ["FORMAT_VERSION", "load_safetensors", "save_safetensors"]

FORMAT_VERSION = 1

KEY_FORMAT_VERSION = "vsteer.format_version"
KEY_MODEL = "vsteer.model"
KEY_METHOD = "vsteer.method"
KEY_PROVENANCE = "vsteer.provenance"
_REQUIRED_KEYS = (KEY_FORMAT_VERSION, KEY_MODEL, KEY_METHOD, KEY_PROVENANCE)

# Canonical decimal only ("layer.01" or "layer.-1" would allow two names for one layer).
_LAYER_NAME = re.compile(r"layer\.(0|[1-9][0-9]*)")


def save_safetensors(vector: SteeringVector, path: str | os.PathLike[str]) -> None:
    """Write ``vector`` to ``path`` in vsteer's safetensors format, atomically.

    The file appears complete or not at all (temporary file + ``os.replace``); tensors are
    written as float32 whatever the vector's dtype.

    Args:
        vector: The vector to write; its layers must be non-negative.
        path: Destination file, conventionally ending in ``.safetensors``.

    Raises:
        VectorFileError: The vector has negative layers, or the file cannot be written.

    Example:
        >>> save_safetensors(SteeringVector.from_tensors({10: [0.5, -0.5]}), "happy.safetensors")
    """
    path = os.fspath(path)
    check_writable_layers(vector, path, prefix="layer.")
    tensors = {
        f"layer.{layer}": t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        for layer, t in vector.layers.items()
    }
    metadata = {
        KEY_FORMAT_VERSION: str(FORMAT_VERSION),
        KEY_MODEL: json.dumps({"name": vector.model, "hidden_size": vector.hidden_size}),
        KEY_METHOD: vector.method,
        KEY_PROVENANCE: json.dumps(vector.provenance, sort_keys=True),
    }
    data = _safetensors_bytes(tensors, metadata)
    with atomic_destination(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def load_safetensors(path: str | os.PathLike[str]) -> SteeringVector:
    """Read a vector from a safetensors file.

    Args:
        path: A file written by ``save_safetensors``, or any safetensors file whose tensors are
            all 1-D and named ``layer.<L>``.

    Returns:
        The vector, with float32 CPU tensors.

    Raises:
        VectorFileError: The file is missing or not safetensors, lacks part of the vsteer
            metadata, was written by a newer vsteer, or holds a tensor that is misnamed, not 1-D,
            of the wrong length, or not finite. ``key`` names the offending metadata key or tensor.

    Example:
        >>> v = load_safetensors("happy.safetensors")
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VectorFileError("no such vector file", path=path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            header = _read_metadata(metadata, path)
            # Check every name before loading anything: a model checkpoint passed by mistake
            # should fail fast, not be read into memory.
            layers: dict[int, Any] = {}
            for name in sorted(f.keys(), key=_layer_sort_key):
                match = _LAYER_NAME.fullmatch(name)
                if match is None:
                    raise VectorFileError(
                        f"unexpected tensor {name!r}: every tensor must be named layer.<L> with L >= 0",
                        path=path,
                        key=name,
                    )
                layers[int(match.group(1))] = name
            if not layers:
                raise VectorFileError("the file holds no layer.<L> tensors", path=path)
            layers = {layer: f.get_tensor(name) for layer, name in layers.items()}
    except VectorFileError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError and friends on bad headers
        raise VectorFileError(f"not a readable safetensors file: {exc}", path=path) from exc

    hidden_size = header.get("hidden_size")
    source = KEY_MODEL
    first_shape: tuple[int, ...] | None = None
    for layer, tensor in layers.items():
        key = f"layer.{layer}"
        if tensor.ndim not in (1, 2):
            raise VectorFileError(
                f"expected a 1-D tensor (or 2-D [positions, hidden]), got shape {tuple(tensor.shape)}",
                path=path,
                key=key,
            )
        if not tensor.is_floating_point():
            raise VectorFileError(f"expected a floating-point tensor, got {tensor.dtype}", path=path, key=key)
        if first_shape is None:
            first_shape = tuple(tensor.shape)
        elif tensor.ndim != len(first_shape) or tensor.shape[:-1] != first_shape[:-1]:
            raise VectorFileError(
                f"tensor has shape {tuple(tensor.shape)} but the first tensor has {first_shape}",
                path=path,
                key=key,
            )
        if hidden_size is None:
            hidden_size, source = tensor.shape[-1], f"the first tensor (layer.{layer})"
        elif tensor.shape[-1] != hidden_size:
            raise VectorFileError(
                f"tensor has length {tensor.shape[-1]} but {source} says hidden_size={hidden_size}",
                path=path,
                key=key,
            )
        layers[layer] = tensor.to(torch.float32)
        if not bool(torch.isfinite(layers[layer]).all()):
            raise VectorFileError("tensor contains NaN or Inf values", path=path, key=key)

    return SteeringVector(
        layers,
        hidden_size,
        model=header.get("name"),
        method=header.get("method", "custom"),
        provenance=header.get("provenance", {}),
    )


def _read_metadata(metadata: dict[str, str], path: str) -> dict[str, Any]:
    """Validate the vsteer metadata; return name, hidden_size, method, provenance (if present)."""
    if not any(key.startswith("vsteer.") for key in metadata):
        return {}  # a file written by another tool: layers only
    for key in _REQUIRED_KEYS:
        if key not in metadata:
            raise VectorFileError("missing vsteer metadata key", path=path, key=key)

    version_text = metadata[KEY_FORMAT_VERSION]
    if not re.fullmatch(r"[0-9]+", version_text):
        raise VectorFileError(
            f"format version must be an integer, got {version_text!r}",
            path=path,
            key=KEY_FORMAT_VERSION,
        )
    version = int(version_text)
    if version > FORMAT_VERSION:
        raise VectorFileError(
            f"file has format version {version}, this vsteer reads up to {FORMAT_VERSION}; upgrade vsteer",
            path=path,
            key=KEY_FORMAT_VERSION,
        )
    if version < 1:
        raise VectorFileError(f"unknown format version {version}", path=path, key=KEY_FORMAT_VERSION)

    model = _json_object(metadata[KEY_MODEL], path, KEY_MODEL)
    name = model.get("name")
    hidden_size = model.get("hidden_size")
    if name is not None and not isinstance(name, str):
        raise VectorFileError(f"model name must be a string or null, got {name!r}", path=path, key=KEY_MODEL)
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise VectorFileError(
            f"hidden_size must be a positive integer, got {hidden_size!r}", path=path, key=KEY_MODEL
        )

    method = metadata[KEY_METHOD]
    if not method:
        raise VectorFileError("method must not be empty", path=path, key=KEY_METHOD)
    provenance = _json_object(metadata[KEY_PROVENANCE], path, KEY_PROVENANCE)
    return {"name": name, "hidden_size": hidden_size, "method": method, "provenance": provenance}


def _json_object(text: str, path: str, key: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise VectorFileError(f"value is not valid JSON: {exc}", path=path, key=key) from exc
    if not isinstance(value, dict):
        raise VectorFileError(f"value must be a JSON object, got {type(value).__name__}", path=path, key=key)
    return value


def _layer_sort_key(name: str) -> tuple[int, int | str]:
    match = _LAYER_NAME.fullmatch(name)
    return (0, int(match.group(1))) if match else (1, name)


def check_writable_layers(vector: SteeringVector, path: str, *, prefix: str) -> None:
    """Files hold absolute layers only: refuse a vector that still has negative keys."""
    negative = [layer for layer in vector.layers if layer < 0]
    if negative:
        raise VectorFileError(
            f"layer {negative[0]} is relative to the end of the model; "
            "call normalize_layers(num_layers) before saving",
            path=path,
            key=f"{prefix}{negative[0]}",
        )


@contextmanager
def atomic_destination(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; move it over ``path`` only if the block succeeds.

    The temporary file lives in the destination folder so ``os.replace`` is an atomic rename
    (it would not be across filesystems). Its name starts with '.' and ends in '.tmp', so
    directory listings that look for finished files skip it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise VectorFileError(f"cannot create a file in {folder}: {exc}", path=path) from exc
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise VectorFileError(f"cannot write the vector file: {exc}", path=path) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
