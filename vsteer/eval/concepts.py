"""Concepts for the steering-quality evaluation, shipped as ``vsteer/eval/data/concepts.json``.

A concept has a name, a short description (for the judge), concept words (for the local
behaviour scorer), positive/negative contrast texts (CAA / mean-difference vectors, SARA's
attract/repel texts, the local scorer's calibration) and an ActAdd prompt pair. ``extra`` keeps
any other keys of the JSON entry, for methods added later (e.g. SAE feature ids per SAE).

Example:
    >>> from vsteer.eval.concepts import load_concepts
    >>> wedding, love = load_concepts(["wedding", "love"])
    >>> wedding.words[:2]
    ('wedding', 'weddings')
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).resolve().parent / "data" / "concepts.json"
_KNOWN = {"name", "description", "words", "positive", "negative", "actadd"}


@dataclass(frozen=True)
class Concept:
    """One concept to steer toward and score."""

    name: str
    description: str
    words: tuple[str, ...]
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    actadd_positive: str
    actadd_negative: str = " "
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Concept:
        """Build from one JSON entry; raises ValueError naming the missing or bad field."""
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError("concept: 'name' must be a non-empty string")
        for key in ("words", "positive", "negative"):
            value = data.get(key)
            if not isinstance(value, list) or not value or not all(isinstance(x, str) and x.strip() for x in value):
                raise ValueError(f"concept {name!r}: {key!r} must be a non-empty list of non-empty strings")
        if not isinstance(data.get("description"), str) or not data["description"].strip():
            raise ValueError(f"concept {name!r}: 'description' must be a non-empty string")
        actadd = data.get("actadd") or {}
        return cls(
            name=name,
            description=data["description"],
            words=tuple(data["words"]),
            positive=tuple(data["positive"]),
            negative=tuple(data["negative"]),
            actadd_positive=str(actadd.get("positive") or name.capitalize()),
            actadd_negative=str(actadd.get("negative", " ")),
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )


@dataclass(frozen=True)
class ConceptSet:
    """All concepts of a data file plus the shared neutral (off-topic) reference texts."""

    concepts: dict[str, Concept]
    neutral: tuple[str, ...]
    path: str

    def get(self, name: str) -> Concept:
        """The concept called ``name`` (case-insensitive); KeyError lists the known ones."""
        key = name.strip().lower()
        for concept in self.concepts.values():
            if concept.name.lower() == key:
                return concept
        raise KeyError(f"unknown concept {name!r}; known concepts: {', '.join(self.concepts)}")


@lru_cache(maxsize=8)
def _load(path: str) -> ConceptSet:
    data = json.loads(Path(path).read_text())
    concepts = [Concept.from_dict(c) for c in data.get("concepts", [])]
    names = [c.name.lower() for c in concepts]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate concept names")
    return ConceptSet({c.name: c for c in concepts}, tuple(data.get("neutral", [])), path)


def concept_set(path: str | os.PathLike | None = None) -> ConceptSet:
    """Read a concepts file (default: the one shipped with vsteer)."""
    return _load(str(Path(path).resolve() if path else DATA_FILE))


def available_concepts(path: str | os.PathLike | None = None) -> list[str]:
    """Names of the concepts in the file, in file order."""
    return list(concept_set(path).concepts)


def load_concepts(names: Sequence[str] | None = None, path: str | os.PathLike | None = None) -> list[Concept]:
    """The named concepts (all of them when ``names`` is None), in the order asked for."""
    cs = concept_set(path)
    if names is None:
        return list(cs.concepts.values())
    return [cs.get(n) for n in names]


def neutral_texts(path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Shared off-topic texts used to calibrate the local scorer."""
    return concept_set(path).neutral
