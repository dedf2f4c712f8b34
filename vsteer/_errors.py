"""Exceptions raised by vsteer.

The hierarchy::

    VsteerError
    ├── SpecError                 a steering request is invalid (names the field)
    ├── VectorFileError           a vector file cannot be read or written
    ├── ModelPreparationError     the default model cannot be found or converted
    ├── UnsupportedArchitectureError  the model's decoder layers cannot be wrapped
    ├── SlotCapacityError         a request needs more steering slots than exist
    └── EngineError               the engine was configured or used wrongly
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class VsteerError(Exception):
    """Base class of every error vsteer raises on purpose."""


class SpecError(VsteerError, ValueError):
    """A steering request is invalid. ``field`` is the dotted path of the bad field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}" if field else message)


class VectorFileError(VsteerError):
    """A vector file cannot be read or written; ``path`` and ``key`` say where."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        self.reason = message if not key else f"{message} (key={key})"  # without the server's path
        where = ", ".join(p for p in (f"path={path}" if path else "", f"key={key}" if key else "") if p)
        super().__init__(f"{message} ({where})" if where else message)


class NameConflictError(VectorFileError):
    """A vector name already points at another vector, and re-pointing it was not asked for."""


class ModelPreparationError(VsteerError):
    """The default model could not be located or converted."""


class UnsupportedArchitectureError(VsteerError):
    """The model's decoder layers are of a kind vsteer cannot wrap."""


class SlotCapacityError(VsteerError):
    """A single request needs more steering slots than the engine has."""

    def __init__(self, *, requested: int, capacity: int, setting: str = "max_slots") -> None:
        self.requested = requested
        self.capacity = capacity
        super().__init__(
            f"a request needs {requested} steering slots but the engine has {capacity} "
            f"(raise {setting})"
        )


class EngineError(VsteerError):
    """The engine was configured or used in a way vsteer does not support."""


@contextmanager
def map_exceptions(mapping: dict[type[BaseException], type[VsteerError]], **context: str) -> Iterator[None]:
    """Translate exceptions of other libraries into vsteer errors, once, at a boundary."""
    try:
        yield
    except tuple(mapping) as exc:  # type: ignore[misc]
        for source, target in mapping.items():
            if isinstance(exc, source):
                raise target(str(exc), **context) from exc
        raise


class SaeFileError(VsteerError):
    """An SAE file or folder cannot be read or written, or does not fit; ``path`` and ``key`` say where."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        self.reason = message if not key else f"{message} (key={key})"  # without the server's path
        where = ", ".join(p for p in (f"path={path}" if path else "", f"key={key}" if key else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
