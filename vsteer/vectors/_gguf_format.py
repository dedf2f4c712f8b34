"""Import and export llama.cpp / repeng GGUF control vectors.

Layout (repeng's ``ControlVector.export_gguf``/``import_gguf``, llama.cpp's
``llama_control_vector_load``)::

    general.architecture       "controlvector"
    controlvector.model_hint   HF model_type of the target model, e.g. "llama"
    controlvector.layer_count  number of direction tensors
    direction.<L>              1-D float32 tensor of length hidden, one per layer

Layer convention: ``direction.L`` is added to the OUTPUT of 0-based decoder layer ``L``, which is
what a vsteer vector's layer ``L`` means too (repeng, llama.cpp and EasySteer agree), so layers
map 1:1 in both directions and a round trip is exact.

Two llama.cpp quirks to know about:

* llama.cpp never steers layer 0 and refuses a file that contains ``direction.0``. Exporting a
  vector with a layer 0 therefore warns; vsteer itself reads such files.
* llama.cpp's own ``cvector-generator`` writes the vector it measured at layer ``L`` as
  ``direction.{L+1}``. Files from that tool are therefore one layer later than where they were
  measured. They are imported as written (``direction.L`` -> layer ``L``), which is also where
  llama.cpp applies them; shift them yourself if you want the measured layer.

On import the model name is unknown (a model_hint is an architecture, not a checkpoint), so it is
None and the hint goes into ``provenance["gguf_model_hint"]``.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import numpy as np
import torch

from vsteer._errors import VectorFileError
from vsteer.vectors._safetensors_format import atomic_destination, check_writable_layers
from vsteer.vectors._vector import SteeringVector

__all__ = ["GGUF_MAGIC", "load_gguf", "save_gguf"]

GGUF_MAGIC = b"GGUF"
ARCHITECTURE = "controlvector"
KEY_ARCHITECTURE = "general.architecture"
KEY_MODEL_HINT = f"{ARCHITECTURE}.model_hint"
KEY_LAYER_COUNT = f"{ARCHITECTURE}.layer_count"
PROVENANCE_MODEL_HINT = "gguf_model_hint"

_DIRECTION_NAME = re.compile(r"direction\.(0|[1-9][0-9]*)")


def save_gguf(vector: SteeringVector, path: str | os.PathLike[str], *, model_hint: str) -> None:
    """Write ``vector`` as a llama.cpp / repeng GGUF control vector, atomically.

    Layer ``L`` is written as ``direction.L`` (float32). Model name, method and provenance are
    not stored: the format has no place for them.

    Args:
        vector: The vector to write; its layers must be non-negative.
        path: Destination file, conventionally ending in ``.gguf``.
        model_hint: HF ``model_type`` of the target model (``"llama"``, ``"qwen2"``...);
            llama.cpp compares it with the model's architecture.

    Raises:
        VectorFileError: Empty ``model_hint``, negative layers, or the file cannot be written.

    Warns:
        UserWarning: The vector has a layer 0; llama.cpp refuses files with ``direction.0``.

    Example:
        >>> save_gguf(vector, "happy.gguf", model_hint="llama")
        >>> # llama-cli -m model.gguf --control-vector happy.gguf
    """
    path = os.fspath(path)
    if not isinstance(model_hint, str) or not model_hint:
        raise VectorFileError(
            f"model_hint must be the target model's HF model_type (e.g. 'llama'), got {model_hint!r}",
            path=path,
            key=KEY_MODEL_HINT,
        )
    check_writable_layers(vector, path, prefix="direction.")
    if vector.num_positions is not None:
        raise VectorFileError(
            "a per-position vector (ActAdd) has no GGUF control-vector form: "
            "control vectors hold one direction per layer",
            path=str(path),
        )
    if 0 in vector.layers:
        warnings.warn(
            f"{path}: the vector has layer 0, written as direction.0; llama.cpp never steers "
            "layer 0 and will refuse to load this file (vsteer and repeng read it)",
            UserWarning,
            stacklevel=2,
        )

    import gguf  # imported here: only GGUF users pay for it

    with atomic_destination(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        try:
            writer.add_string(KEY_MODEL_HINT, model_hint)
            writer.add_uint32(KEY_LAYER_COUNT, len(vector))
            for layer, tensor in vector.layers.items():
                array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
                writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(array))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def load_gguf(path: str | os.PathLike[str]) -> SteeringVector:
    """Read a llama.cpp / repeng GGUF control vector.

    ``direction.L`` becomes layer ``L`` (see the module docstring for files made by llama.cpp's
    cvector-generator, which are one layer late). ``controlvector.layer_count`` is not checked:
    writers disagree on it and llama.cpp ignores it.

    Args:
        path: A GGUF file with ``general.architecture = "controlvector"``.

    Returns:
        The vector, float32 on the CPU, with ``model=None`` and
        ``provenance={"gguf_model_hint": <hint>}`` when the file has a hint.

    Raises:
        VectorFileError: The file is missing or not GGUF, is not a control vector, or holds a
            tensor that is misnamed, not 1-D float, of the wrong length, or not finite. ``key``
            names the offending metadata key or tensor.

    Example:
        >>> v = load_gguf("happy.gguf")
        >>> v.provenance
        {'gguf_model_hint': 'llama'}
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VectorFileError("no such vector file", path=path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise VectorFileError("not a GGUF file (no 'GGUF' magic at offset 0)", path=path)

    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # truncated or corrupt files raise ValueError, IndexError, ...
        raise VectorFileError(f"not a readable GGUF file: {exc}", path=path) from exc

    architecture = _string_field(reader, KEY_ARCHITECTURE, path)
    if architecture is None:
        raise VectorFileError("missing metadata key", path=path, key=KEY_ARCHITECTURE)
    if architecture != ARCHITECTURE:
        raise VectorFileError(
            f"expected {ARCHITECTURE!r}, got {architecture!r}: this is not a control vector",
            path=path,
            key=KEY_ARCHITECTURE,
        )
    model_hint = _string_field(reader, KEY_MODEL_HINT, path)

    layers: dict[int, torch.Tensor] = {}
    hidden_size: int | None = None
    for tensor in reader.tensors:
        name = tensor.name
        match = _DIRECTION_NAME.fullmatch(name)
        if match is None:
            raise VectorFileError(
                f"unexpected tensor {name!r}: every tensor must be named direction.<L> with L >= 0",
                path=path,
                key=name,
            )
        layer = int(match.group(1))
        if layer in layers:
            raise VectorFileError("tensor appears twice", path=path, key=name)
        if len(tensor.shape) != 1:
            raise VectorFileError(
                f"expected a 1-D tensor, got shape {tuple(int(n) for n in tensor.shape)}",
                path=path,
                key=name,
            )
        data = np.asarray(tensor.data)
        if data.dtype.kind != "f":
            raise VectorFileError(
                f"expected a float tensor, got GGML type {tensor.tensor_type.name}",
                path=path,
                key=name,
            )
        # Copy out of the reader's memory map, so the file is not held open by the vector.
        values = torch.from_numpy(np.array(data, dtype=np.float32).reshape(-1))
        if hidden_size is None:
            hidden_size = values.shape[0]
        elif values.shape[0] != hidden_size:
            raise VectorFileError(
                f"tensor has length {values.shape[0]}, the earlier tensors have {hidden_size}",
                path=path,
                key=name,
            )
        if not bool(torch.isfinite(values).all()):
            raise VectorFileError("tensor contains NaN or Inf values", path=path, key=name)
        layers[layer] = values
    if hidden_size is None:
        raise VectorFileError("the file holds no direction.<L> tensors", path=path)

    provenance = {PROVENANCE_MODEL_HINT: model_hint} if model_hint is not None else {}
    return SteeringVector(layers, hidden_size, model=None, provenance=provenance)


def _string_field(reader: Any, key: str, path: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    import gguf

    if not field.types or field.types[0] != gguf.GGUFValueType.STRING or not field.data:
        raise VectorFileError("expected a string value", path=path, key=key)
    # parts[data[-1]] holds the string's bytes (works on gguf versions without Field.contents()).
    return bytes(field.parts[field.data[-1]]).decode("utf-8", errors="replace")
