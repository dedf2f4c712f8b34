"""Rows of a rollout dataset: what one input row asks for, and what one output record holds."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vsteer._errors import SpecError

SEED_BITS = 31  # vLLM takes any int; 31 bits keep seeds portable to every sampler


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str


class RolloutRow(BaseModel):
    """One input row: a prompt (or chat messages), its steering and its sampling parameters."""

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = Field(default=None, description="Row id (default: 0-based row number).")
    prompt: str | None = Field(default=None, description="Prompt text.")
    messages: list[ChatMessage] | None = Field(default=None, description="Chat messages (rendered with the model's chat template).")
    steering: Any = Field(default=None, description="A steering spec (names of stored vectors allowed) or null.")
    n: int = Field(default=1, ge=1, le=1024, description="Samples for this row.")
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 = off.")
    seed: int | None = Field(default=None, description="Seed of sample 0 (default: derived from the run seed and row id).")
    logprobs: bool = Field(default=False, description="Record the log-probability of each generated token.")
    ignore_eos: bool = Field(default=False, description="Generate exactly max_tokens (fixed-length rollouts).")

    @model_validator(mode="after")
    def _one_prompt(self) -> "RolloutRow":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a row needs exactly one of 'prompt' and 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' is empty")
        return self


def parse_row(data: Any, index: int) -> tuple[str, RolloutRow]:
    """Validate one input row; returns (row id, row). Raises SpecError naming the field."""
    if not isinstance(data, dict):
        raise SpecError(f"expected a JSON object, got {type(data).__name__}", field="row")
    try:
        row = RolloutRow.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "row"
        raise SpecError(err["msg"].removeprefix("Value error, "), field=field) from exc
    return str(row.id if row.id is not None else index), row


def condition_layers(rows: Any) -> list[int]:
    """The layers the rows' conditional steering (``when``) reads, for the engine's
    ``condition_layers``; rows that do not parse are skipped here (they fail later, by name)."""
    from vsteer.spec import Condition, parse_spec

    layers: set[int] = set()
    for _, data in rows:
        try:
            spec = parse_spec(data.get("steering")) if isinstance(data, dict) else None
        except SpecError:
            continue
        for item in spec.interventions if spec is not None else ():
            when = getattr(item, "when", None)
            if when is not None:
                layers.update(c.layer for c in ([when] if isinstance(when, Condition) else when.conditions))
    return sorted(layers)


def sample_seed(run_seed: int, row_id: str, sample: int, row_seed: int | None = None) -> int:
    """Seed of one sample: the row's own seed for sample 0 if given, else derived from the run
    seed, the row id and the sample index, so reruns and any number of workers agree."""
    if row_seed is not None and sample == 0:
        return row_seed
    base = f"{row_seed}" if row_seed is not None else f"run{run_seed}"
    digest = hashlib.sha256(f"{base}:{row_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << SEED_BITS) - 1)
