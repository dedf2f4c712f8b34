"""The steering request: the wire format every front end accepts (DESIGN.md section 3).

A request is a list of interventions that compose in order. Each names a vector (a registered
name, a sha256 from the vector store, a path to a vector file, or an inline list of floats), the
decoder layers it acts on (0-indexed; the OUTPUT of layer L is changed), and the token positions.

Example:
    >>> SteeringSpec.model_validate({"interventions": [
    ...     {"op": "add", "vector": "love.safetensors", "layers": [10], "scale": 4.0}]})
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from vsteer._errors import SpecError

#: Default bound on |scale|; larger values are almost certainly a mistake (the engine folds
#: scales into float32 rows, and a scale of 1e6 on a unit vector destroys any model).
DEFAULT_MAX_ABS_SCALE = 1.0e4
#: Bound on every token count and absolute position in a spec (positions, schedule lengths):
#: what the engine's int32 position arithmetic carries.
MAX_TOKEN_INDEX = 2**31 - 1
#: Bound on |from| and |to| of a linear schedule (the multiplier travels as float32).
MAX_SCHEDULE_MULTIPLIER = 1.0e6
#: Bound on |entry| of any steering vector, inline or stored: steering directions are O(1..100);
#: larger entries only overflow the engine's dtype (see ``vsteer.engine.plan.check_magnitudes``).
MAX_ABS_VECTOR_ENTRY = 1.0e6

Positions = Union[Literal["all", "prompt", "generated", "from_last_prompt_token"], tuple[int, int]]
VectorRef = Union[str, list[float]]


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ConstantSchedule(_Schedule):
    """The scale itself at every token (the same as no schedule)."""

    kind: Literal["constant"]


class LinearSchedule(_Schedule):
    """``from + (to - from) * min(t, over) / over`` times the scale."""

    kind: Literal["linear"]
    from_: float = Field(alias="from", allow_inf_nan=False, ge=-MAX_SCHEDULE_MULTIPLIER, le=MAX_SCHEDULE_MULTIPLIER,
                         description="Multiplier at generated token 0 (and on the prompt).")
    to: float = Field(allow_inf_nan=False, ge=-MAX_SCHEDULE_MULTIPLIER, le=MAX_SCHEDULE_MULTIPLIER,
                      description="Multiplier from generated token `over` on.")
    over: int = Field(ge=1, le=MAX_TOKEN_INDEX,
                      description="Generated tokens over which the multiplier moves from `from` to `to`.")


class ExpSchedule(_Schedule):
    """``0.5 ** (t / half_life)`` times the scale."""

    kind: Literal["exp"]
    half_life: float = Field(gt=0, le=MAX_TOKEN_INDEX, allow_inf_nan=False,
                             description="Generated tokens after which the multiplier has halved.")


class WindowSchedule(_Schedule):
    """The scale on generated tokens ``start <= t < start + length``, nothing elsewhere."""

    kind: Literal["window"]
    start: int = Field(ge=0, le=MAX_TOKEN_INDEX, description="First generated token steered (0 also steers the prompt).")
    length: int = Field(ge=1, le=MAX_TOKEN_INDEX, description="Number of generated tokens steered.")


Schedule = Annotated[
    Union[ConstantSchedule, LinearSchedule, ExpSchedule, WindowSchedule], Field(discriminator="kind")
]


def _checked_vector(value: VectorRef | None) -> VectorRef | None:
    if value is None:
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("vector reference is empty")
    else:
        if len(value) == 0:
            raise ValueError("inline vector is empty")
        bad = [i for i, x in enumerate(value) if not math.isfinite(x)]
        if bad:
            raise ValueError(f"inline vector has NaN/Inf at index {bad[0]}")
        big = next((i for i, x in enumerate(value) if abs(x) > MAX_ABS_VECTOR_ENTRY), None)
        if big is not None:
            raise ValueError(f"inline vector entry {big} is {value[big]:g}; entries are bounded by {MAX_ABS_VECTOR_ENTRY:g}")
    return value


class Condition(BaseModel):
    """CAST's condition (Lee et al. 2024): with ``c`` the vector at ``layer`` and ``h`` the prompt's
    pooled residual at the output of ``layer``, ``sim = cos(h, tanh(P h))``, ``P = c c^T / (c^T c)``.
    The condition holds when ``sim > threshold`` (``above``) or ``sim < threshold`` (``below``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vector: VectorRef = Field(description="The condition vector: a stored name or sha256, a file, or an inline list.")
    layer: int = Field(ge=0, description="Decoder layer whose OUTPUT (before its own steering) is pooled; it must "
                                         "be one of the engine's condition_layers.")
    threshold: float = Field(allow_inf_nan=False, description="Compared with the similarity.")
    compare: Literal["above", "below"] = Field(
        default="above", description='"above": holds when sim > threshold (IBM\'s comparator "smaller"); '
        '"below": when sim < threshold (IBM\'s "larger").')
    pool: Literal["mean", "last"] = Field(default="mean", description="Mean of the prompt's tokens, or its last token.")

    @field_validator("vector")
    @classmethod
    def _check_vector(cls, value: VectorRef) -> VectorRef:
        return _checked_vector(value)


class ConditionSet(BaseModel):
    """Several conditions combined with ``any`` or ``all``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conditions: list[Condition] = Field(min_length=1, description="The conditions.")
    combine: Literal["any", "all"] = Field(default="any", description="Gate on when any (or all) of them hold.")


def _when_kind(value: Any) -> str:
    return "set" if isinstance(value, dict) and "conditions" in value or isinstance(value, ConditionSet) else "one"


When = Annotated[Union[Annotated[Condition, Tag("one")], Annotated[ConditionSet, Tag("set")]],
                 Discriminator(_when_kind)]


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vector: VectorRef = Field(
        description="A registered vector name, a sha256 of the vector store, a path to a "
        ".safetensors/.gguf vector file, an SAE decoder row as 'sae:<sae name>/<feature>', or "
        "an inline list of floats (then the same direction is used at every listed layer)."
    )
    layers: list[int] | None = Field(
        default=None,
        description="0-indexed decoder layers whose OUTPUT is changed. Defaults to the layers "
        "stored in the vector file; required for inline vectors.",
    )
    positions: Positions = Field(
        default="all",
        description='"all" (prompt and generated tokens), "prompt", "generated", '
        '"from_last_prompt_token" (the last prompt token and every generated one: CAA), or '
        "[start, end) absolute token positions. A per-position vector (ActAdd) adds its row p "
        "at prompt position p, front-aligned, within these positions.",
    )

    schedule: Schedule | None = Field(
        default=None,
        description="The scale as a function of t, the generated-token index (t = 0 at position "
        "prompt_len; prompt tokens use t = 0): constant, linear, exp or window (vsteer.schedules). "
        "add (without normalize) and affine only; at a layer, all edits other than sas share one "
        "schedule, which multiplies the layer's composed change.",
    )

    when: When | None = Field(
        default=None,
        description="Conditional steering (CAST): a condition, or {conditions, combine}. Decided from the "
        "request's own prompt; the gated edit then acts on the generated tokens, and on the last prompt "
        "token at layers after every condition's layer. Not on sas; at a layer, all edits share one gate.",
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> "_Op":
        if self.when is not None and getattr(self, "op", None) == "sas":
            raise ValueError("when (conditional steering) is not supported on 'sas'")
        if self.schedule is None:
            return self
        op = getattr(self, "op", None)
        if op not in ("add", "affine"):
            raise ValueError(f"schedule is supported on 'add' and 'affine', not on {op!r}")
        if getattr(self, "normalize", False):
            raise ValueError("schedule cannot be combined with normalize")
        return self

    @field_validator("vector")
    @classmethod
    def _check_vector(cls, value: VectorRef | None) -> VectorRef | None:
        return _checked_vector(value)

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if len(value) == 0:
            raise ValueError("layers is empty; omit it to use the vector's own layers")
        if len(set(value)) != len(value):
            raise ValueError(f"layers has duplicates: {value}")
        return value

    @field_validator("positions")
    @classmethod
    def _check_positions(cls, value: Positions) -> Positions:
        if isinstance(value, tuple):
            start, end = value
            if start < 0 or end <= start or end > MAX_TOKEN_INDEX:
                raise ValueError(
                    f"position range must be [start, end) with 0 <= start < end <= {MAX_TOKEN_INDEX}, got {list(value)}"
                )
        return value


class AddOp(_Op):
    """h' = h + scale * v at the output of each listed layer (optionally keeping ||h||)."""

    op: Literal["add"] = "add"
    scale: float = Field(default=1.0, description="Multiplier of the vector.")
    normalize: bool = Field(
        default=False,
        description="Rescale each steered token's residual to the norm it had before this "
        "layer's steering.",
    )

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"scale must be finite, got {value}")
        return value


class AblateOp(_Op):
    """h' = h - (h . u) u with u = v / ||v||: remove the component along the direction."""

    op: Literal["ablate"] = "ablate"


class SaraOp(_Op):
    """SARA: h' = h * (1 + scale * r), r per neuron from the request's own prompt.

    r = s_att - s_rep, the per-neuron cosine similarities of the prompt's SVD-reduced residuals
    with those of an attract and a repel prompt (see ``vsteer.methods.sara``). ``vector`` names a
    saved SARA set (``vsteer extract sara``); or give ``attract`` and ``repel`` texts instead.
    """

    op: Literal["sara"] = "sara"
    vector: VectorRef | None = Field(default=None, description="A saved SARA set (path or name).")
    attract: str | None = Field(default=None, description="Text whose activations to move toward.")
    repel: str | None = Field(default=None, description="Text whose activations to move away from.")
    scale: float = Field(default=1.0, description="c in A' = A * (1 + c r).")

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, value: float) -> float:
        return AddOp._check_scale(value)

    @model_validator(mode="after")
    def _check_source(self) -> "SaraOp":
        has_set = self.vector is not None
        has_prompts = self.attract is not None or self.repel is not None
        if has_set == has_prompts or (has_prompts and not (self.attract and self.repel)):
            raise ValueError("sara needs either 'vector' (a saved SARA set) or both 'attract' and 'repel'")
        if self.layers is not None and len(self.layers) != 1:
            raise ValueError(f"sara acts at exactly one layer, got {self.layers}")
        return self


class SasOp(_Op):
    """Sparse activation steering through an SAE (Bayat et al. 2025), error term kept:
    ``h' = h + W_dec^T (sigma(z + scale * s) - z)``, ``z = f(h)``, at the SAE's layer.

    ``vector`` is a sparse vector in the SAE's feature space (``vsteer extract sas``), ``sae``
    names an SAE the engine was started with. ``scale = 0`` is exactly the unsteered model.
    """

    op: Literal["sas"] = "sas"
    sae: str = Field(description="Name of an SAE loaded in the engine (it fixes the layer).")
    scale: float = Field(default=1.0, description="lambda in sigma(z + lambda * s).")

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, value: float) -> float:
        return AddOp._check_scale(value)

    @field_validator("sae")
    @classmethod
    def _check_sae(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("sae name is empty")
        return value


class AffineOp(_Op):
    """h' = h + scale * ((h A^T) B + b): a low-rank affine edit, folded into the slot bank like
    ``ablate`` (its rank counts toward ``max_ablation_rank``). ``vector`` names an affine file:
    a vector file whose tensor at each layer stacks ``A [r, d]``, ``B [r, d]`` and ``b [d]`` as
    ``[2r + 1, d]`` (``vsteer.methods.affine_vector`` writes one; ``loreft_vector`` turns a LoReFT
    intervention ``h + R^T(W h + b - R h)`` into one)."""

    op: Literal["affine"] = "affine"
    scale: float = Field(default=1.0, description="Multiplier of the whole edit.")

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, value: float) -> float:
        return AddOp._check_scale(value)


Intervention = Annotated[Union[AddOp, AblateOp, SaraOp, SasOp, AffineOp], Field(discriminator="op")]


class SteeringSpec(BaseModel):
    """A steering request: interventions applied in the order given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interventions: list[Intervention] = Field(
        description="Interventions, composed in order at each layer.", min_length=1
    )

    def check_scales(self, max_abs_scale: float = DEFAULT_MAX_ABS_SCALE) -> None:
        """Raise SpecError for a scale whose magnitude exceeds ``max_abs_scale``."""
        for i, item in enumerate(self.interventions):
            if isinstance(item, (AddOp, SaraOp, SasOp, AffineOp)) and abs(item.scale) > max_abs_scale:
                raise SpecError(
                    f"|scale| = {abs(item.scale):g} exceeds the bound {max_abs_scale:g}",
                    field=f"interventions.{i}.scale",
                )
            if isinstance(item.schedule, LinearSchedule):
                peak = abs(item.scale) * max(abs(item.schedule.from_), abs(item.schedule.to))
                if peak > max_abs_scale:
                    raise SpecError(
                        f"|scale| x the linear schedule's largest multiplier = {peak:g} exceeds the bound "
                        f"{max_abs_scale:g}",
                        field=f"interventions.{i}.schedule",
                    )


_TYPE_NAMES = frozenset({"add", "ablate", "sara", "sas", "affine", "str", "int", "float", "bool", "list", "dict",
                         "constant", "linear", "exp", "window", "one", "set"})


def _is_union_branch(part: object) -> bool:
    """pydantic puts union branch names (op tags, 'literal[...]', 'tuple[int, int]') in error
    locations; they are not fields."""
    return isinstance(part, str) and (part in _TYPE_NAMES or "[" in part)


def parse_spec(value: Any) -> SteeringSpec | None:
    """Validate a steering request given as a SteeringSpec, dict, list of interventions,
    JSON text, or None (unsteered).

    Raises:
        SpecError: naming the first bad field (dotted path), e.g. ``interventions.0.layers``.
    """
    if value is None or isinstance(value, SteeringSpec):
        return value
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SpecError(f"malformed JSON: {exc.msg} at char {exc.pos}", field="steering") from exc
        if value is None:
            return None
    if isinstance(value, list):
        value = {"interventions": value}
    if not isinstance(value, dict):
        raise SpecError(
            f"expected an object with 'interventions', got {type(value).__name__}", field="steering"
        )
    try:
        return SteeringSpec.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"] if not _is_union_branch(p))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid" and field.endswith("schedule"):
            msg = (f"unknown schedule kind {err.get('input', {}).get('kind')!r}; expected 'constant', 'linear', "
                   "'exp' or 'window'")
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown op {err.get('input', {}).get('op')!r}; expected 'add', 'ablate', 'sara', 'sas' or 'affine'"
        raise SpecError(msg, field=field or "steering") from exc
