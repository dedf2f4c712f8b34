"""Steering vectors: the `SteeringVector` value object, its file formats and a content store.

Formats: vsteer's safetensors layout (`save_safetensors`/`load_safetensors`) and llama.cpp /
repeng GGUF control vectors (`save_gguf`/`load_gguf`); `save_vector`/`load_vector` pick one by
suffix or magic bytes. `VectorStore` keeps vectors by the sha256 of their numbers, with optional
names; `check_vector_model` refuses a vector made for another model.
"""

from vsteer.vectors._gguf_format import load_gguf, save_gguf
from vsteer.vectors._safetensors_format import load_safetensors, save_safetensors
from vsteer.vectors._store import VectorStore, load_vector, save_vector

# Importable as vsteer.vectors.check_vector_model (for the engine) but kept out of __all__, which
# tests/vectors/test_vector.py::test_public_names pins; also reachable as VectorStore.check_model.
from vsteer.vectors._store import check_vector_model as check_vector_model
from vsteer.vectors._vector import SteeringVector

__all__ = [
    "SteeringVector",
    "VectorStore",
    "load_gguf",
    "load_safetensors",
    "load_vector",
    "save_gguf",
    "save_safetensors",
    "save_vector",
]
