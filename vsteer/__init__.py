"""vsteer: per-request activation steering inside vLLM.

``vsteer.LLM`` (imported lazily: it loads vLLM) runs a vLLM engine whose requests each carry
their own steering spec. Everything else here imports with plain torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vsteer._errors import (
    EngineError,
    ModelPreparationError,
    SaeFileError,
    SlotCapacityError,
    SpecError,
    UnsupportedArchitectureError,
    VectorFileError,
    VsteerError,
)
from vsteer.methods import mean_difference
from vsteer.spec import SteeringSpec, parse_spec
from vsteer.vectors import SteeringVector, VectorStore, load_vector, save_vector

if TYPE_CHECKING:
    from vsteer.engine.llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "EngineError",
    "ModelPreparationError",
    "SaeFileError",
    "SlotCapacityError",
    "SpecError",
    "SteeringSpec",
    "SteeringVector",
    "UnsupportedArchitectureError",
    "VectorFileError",
    "VectorStore",
    "VsteerError",
    "load_vector",
    "main",
    "mean_difference",
    "parse_spec",
    "save_vector",
]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        try:
            from vsteer.engine.llm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                f"vsteer.LLM needs vLLM ({exc}); install `vsteer[cpu]` or `vsteer[gpu]`"
            ) from exc
        return LLM
    if name == "main":
        from vsteer.cli import main

        return main
    raise AttributeError(f"module 'vsteer' has no attribute {name!r}")
