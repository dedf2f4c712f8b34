"""Steering plans: a validated spec with its vectors resolved to store hashes.

The plan is what travels to the engine in ``SamplingParams.extra_args["vsteer"]``: a few hundred
bytes of JSON, the vectors themselves are read by hash from the vector store. This module is
pure torch (no vLLM) so the scheduler, the worker and the tests share one definition of

- which interventions are active at which token position (``segments``), and
- how the active interventions at one layer fold into one slot-bank row (``fold_layer``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import torch
from pydantic import TypeAdapter, ValidationError

from vsteer import schedules
from vsteer._errors import SpecError, VectorFileError
from vsteer.kernels import BankLayout
from vsteer.spec import (
    DEFAULT_MAX_ABS_SCALE,
    AblateOp,
    AffineOp,
    AddOp,
    Condition,
    ConditionSet,
    SaraOp,
    SasOp,
    Schedule,
    SteeringSpec,
    parse_spec,
)
from vsteer.vectors import SteeringVector, VectorStore, load_vector

if TYPE_CHECKING:
    from vsteer.sae import SaeStore, SparseAutoencoder

EXTRA_ARGS_KEY = "vsteer"
SAE_FEATURE_PREFIX = "sae:"
PLAN_VERSION = 1
_INF = 1 << 62  # "until the end of the sequence"


@dataclass(frozen=True)
class ResolvedIntervention:
    """One intervention with its vector named by sha256 and its layers made explicit."""

    op: str
    vector: str
    layers: tuple[int, ...]
    scale: float = 1.0
    positions: str | tuple[int, int] = "all"
    normalize: bool = False
    rows: int = 0  # > 0: a per-position vector whose row p is added at prompt position p
    sae: str | None = None  # sas: the engine SAE's name
    support: int = 0  # sas: non-zero features of the vector (0 for TopK: nothing to budget)
    width: int = 0  # sas: the SAE's d_sae
    schedule: tuple | None = None  # vsteer.schedules form; None = the scale at every token
    when: tuple | None = None  # (combine, ((vector sha, layer, threshold, compare, pool), ...)); None = ungated

    def to_json(self) -> dict:
        data = {
            "op": self.op,
            "vector": self.vector,
            "layers": list(self.layers),
            "scale": self.scale,
            "positions": list(self.positions) if isinstance(self.positions, tuple) else self.positions,
            "normalize": self.normalize,
            "rows": self.rows,
        }
        if self.op == "sas":
            data.update(sae=self.sae, support=self.support, width=self.width)
        if self.schedule is not None:  # absent otherwise: plans without schedules keep their hashes
            data["schedule"] = schedules.from_tuple(self.schedule)
        if self.when is not None:
            data["when"] = when_to_json(self.when)
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> "ResolvedIntervention":
        pos = data["positions"]
        return cls(
            op=data["op"],
            vector=data["vector"],
            layers=tuple(int(x) for x in data["layers"]),
            scale=float(data["scale"]),
            positions=tuple(pos) if isinstance(pos, list) else pos,
            normalize=bool(data["normalize"]),
            rows=int(data.get("rows", 0)),
            sae=data.get("sae"),
            support=int(data.get("support", 0)),
            width=int(data.get("width", 0)),
            schedule=parse_schedule(data.get("schedule")),
            when=parse_when(data.get("when")),
        )

    def active_at(self, start: int, prompt_len: int) -> bool:
        """Whether this intervention acts on the token at absolute position ``start``."""
        if self.rows and not start < min(self.rows, prompt_len):
            return False  # per-position rows cover the first prompt positions only
        if self.positions == "all":
            return True
        if self.positions == "prompt":
            return start < prompt_len
        if self.positions == "generated":
            return start >= prompt_len
        if self.positions == "from_last_prompt_token":
            return start >= prompt_len - 1
        lo, hi = self.positions
        return lo <= start < hi


class Segment(NamedTuple):
    """Token positions [start, end) on which the same interventions are active."""

    start: int
    end: int
    key: str | None  # slot key of the folded transform; None = identity (slot 0)
    active: tuple[int, ...]


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class SteeringPlan:
    """A resolved steering request, ready for the engine."""

    interventions: tuple[ResolvedIntervention, ...]

    @property
    def hash(self) -> str:
        """Content hash of the whole request (used as the prefix-cache salt)."""
        return _digest([i.to_json() for i in self.interventions])

    def to_extra_args(self) -> dict:
        return {"v": PLAN_VERSION, "interventions": [i.to_json() for i in self.interventions]}

    @classmethod
    def from_extra_args(cls, data: Mapping | str) -> "SteeringPlan":
        """From ``extra_args["vsteer"]``: the dict, or the same as JSON text (the server's form,
        since vLLM's ``vllm_xargs`` are flat)."""
        if isinstance(data, str):
            data = json.loads(data)
        if data.get("v") != PLAN_VERSION:
            raise SpecError(f"unsupported steering plan version {data.get('v')!r}", field="vsteer.v")
        return cls(tuple(ResolvedIntervention.from_json(d) for d in data["interventions"]))

    def segment_key(self, active: Sequence[int], start: int = 0) -> str | None:
        """Slot key of the transform made by the ``active`` interventions at position ``start``.

        The key ignores ``positions`` so two requests whose active interventions coincide share
        a slot, whatever else they do elsewhere in the sequence. A per-position vector
        contributes its row, ``start``.
        """
        if not active:
            return None
        items = []
        for i in active:
            d = self.interventions[i].to_json()
            del d["positions"]
            d.pop("schedule", None)  # applied per token on top of the row: rows are shared
            d.pop("when", None)  # so is the gate
            if d["rows"]:
                d["row"] = start
            items.append(d)
        return _digest(items)

    def segments(self, prompt_len: int) -> list[Segment]:
        """Split [0, inf) into maximal runs of positions with the same transform."""
        cuts = {0, prompt_len, max(prompt_len - 1, 0)}
        for item in self.interventions:
            if isinstance(item.positions, tuple):
                cuts.update(item.positions)
            cuts.update(range(min(item.rows, prompt_len) + 1))
        bounds = sorted(c for c in cuts if c >= 0) + [_INF]
        out: list[Segment] = []
        for start, end in zip(bounds, bounds[1:]):
            if start >= end:
                continue
            active = tuple(i for i, it in enumerate(self.interventions) if it.active_at(start, prompt_len))
            key = self.segment_key(active, start)
            if out and out[-1].key == key:
                out[-1] = out[-1]._replace(end=end)
            else:
                out.append(Segment(start, end, key, active))
        return out

    def slot_keys(self, prompt_len: int) -> frozenset[str]:
        """The distinct non-identity slot keys this request needs."""
        return frozenset(s.key for s in self.segments(prompt_len) if s.key is not None)

    def layer_schedules(self) -> dict[int, tuple]:
        """Layer -> the schedule its (non-sas) edits share, for the layers that have one."""
        return {layer: it.schedule for it in self.interventions if it.schedule is not None and it.op != "sas"
                for layer in it.layers}

    def layer_gates(self) -> dict[int, tuple]:
        """Layer -> the gate (``when``) its (non-sas) edits share, for the gated layers."""
        return {layer: it.when for it in self.interventions if it.when is not None and it.op != "sas"
                for layer in it.layers}

    def gates(self) -> tuple[tuple, ...]:
        """The plan's distinct gates, in order of first use."""
        return tuple(dict.fromkeys(it.when for it in self.interventions if it.when is not None))

    def sas_widths(self) -> dict[int, int]:
        """SAE layer -> d_sae, for the layers this plan's sas ops use."""
        return {it.layers[0]: it.width for it in self.interventions if it.op == "sas"}

    def sas_loads(self, prompt_len: int) -> dict[str, dict[int, int]]:
        """Per non-identity slot key, the SAS support size it brings to each SAE layer."""
        out: dict[str, dict[int, int]] = {}
        for seg in self.segments(prompt_len):
            if seg.key is None:
                continue
            load: dict[int, int] = {}
            for i in seg.active:
                item = self.interventions[i]
                if item.op == "sas":
                    load[item.layers[0]] = load.get(item.layers[0], 0) + item.support
            out[seg.key] = load
        return out

    def max_slots_needed(self) -> int:
        """The most slots this request can need, over all prompt lengths (checked where the
        segmentation can change: around every range boundary and per-position row count)."""
        points = {1, 2, 1 << 20}
        for it in self.interventions:
            points.update(it.positions if isinstance(it.positions, tuple) else ())
            points.add(it.rows)
        lengths = {max(n + d, 1) for n in points for d in (-1, 0, 1)}
        return max(len(self.slot_keys(n)) for n in lengths)


def _direction(vector: SteeringVector, layer: int, row: int = 0) -> torch.Tensor:
    tensor = _layer_tensor(vector, layer)
    return tensor[row] if tensor.ndim == 2 else tensor


def fold_layer(
    interventions: Sequence[ResolvedIntervention],
    layer: int,
    vectors: Callable[[str], SteeringVector],
    layout: BankLayout,
    position: int = 0,
) -> torch.Tensor:
    """Fold the interventions acting at ``layer`` (in order) into one bank row.

    The row encodes ``h' = h*m - sum_k (h . L_k) R_k + a`` (then optionally rescaled to ||h||).
    Composition stays in that form: adding b sets ``a += b``; ablating a unit u maps
    ``g -> g - (g.u) u`` which sets ``R_k -= (R_k.u) u``, appends ``(L, R) = (m*u, u)`` and
    sets ``a -= (a.u) u``; multiplying by a per-neuron factor f (SARA) scales m, every R_k and
    a by f. A per-position vector contributes its row ``position``. Computed in float64,
    stored as float32.
    """
    d = layout.hidden_size
    m = torch.ones(d, dtype=torch.float64)
    a = torch.zeros(d, dtype=torch.float64)
    left: list[torch.Tensor] = []
    right: list[torch.Tensor] = []
    normalize = False
    for item in interventions:
        if layer not in item.layers or item.op == "sas":  # sas is not affine: its own bank
            continue
        v = _direction(vectors(item.vector), layer, position if item.rows else 0).to(torch.float64)
        if item.op == "add":
            a = a + item.scale * v
            normalize = normalize or item.normalize
        elif item.op == "mul":
            m, a, right = m * v, a * v, [r * v for r in right]
        elif item.op == "affine":
            A, B, b = split_affine(_layer_tensor(vectors(item.vector), layer).to(torch.float64))
            B, b, r = item.scale * B, item.scale * b, A.shape[0]
            # g' = g + ((g A^T) B + b) with g = h*m - sum_k (h.L_k) R_k + a
            right = [rj + (A @ rj) @ B for rj in right]
            left += [m * A[k] for k in range(r)]
            right += [-B[k] for k in range(r)]
            a = a + (A @ a) @ B + b
        elif item.op == "ablate":
            u = v / v.norm()
            right = [r - (r @ u) * u for r in right]
            left.append(m * u)
            right.append(u)
            a = a - (a @ u) * u
        else:
            raise SpecError(f"op {item.op!r} cannot be folded into an affine slot")
    if len(left) > layout.rank:
        raise SpecError(
            f"{len(left)} ablations at layer {layer} exceed the engine's max_ablation_rank="
            f"{layout.rank}",
            field="interventions",
        )
    zeros = torch.zeros(d, dtype=torch.float64)
    left += [zeros] * (layout.rank - len(left))
    right += [zeros] * (layout.rank - len(right))
    stack = (lambda xs: torch.stack(xs)) if layout.rank else (lambda xs: torch.zeros(0, d))
    row = layout.pack_row(m.float(), a.float(), stack(left).float(), stack(right).float(), normalize)
    if not bool(torch.isfinite(row).all()):
        raise SpecError(f"the folded transform at layer {layer} overflows float32", field="interventions")
    return row


#: Bound on the norm any steered residual may reach, as a bound on what steering can add (see
#: :func:`check_magnitudes`): squares of a residual entry and their sum over the hidden size stay
#: far inside float32 (RMSNorm's accumulator), and float16 engines are held below their own maximum.
def magnitude_limit(dtype: torch.dtype | str | None = None) -> float:
    """The bound :func:`check_magnitudes` applies for an engine of ``dtype`` (default float32)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), torch.float32)
    fmax = torch.finfo(dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32).max
    return min(torch.finfo(torch.float32).max ** 0.5 / 1e3, fmax / 64)


def check_magnitudes(plan: "SteeringPlan", vectors: Callable[[str], SteeringVector], limit: float) -> None:
    """Refuse a plan whose steering could drive the residual past ``limit`` (in 2-norm).

    Bounds, in float64, what the plan's edits can do to a residual ``h`` at each layer, whichever of
    them are active at a token and under any schedule value: ``||h'|| <= G ||h|| + S`` (an add of
    ``s v`` adds ``|s| ||v||`` to S; an ablation is a projection; an affine edit multiplies both by
    ``1 + |s| ||A|| ||B||`` and adds ``|s| ||b||``; a schedule multiplies the change by at most its
    largest value). Across layers the gains multiply and the shifts carry forward. Linear in the
    plan's vector sizes. The steer op then never sees a row or multiplier the dtype cannot carry.

    Raises:
        SpecError: naming ``interventions`` and the layer where the bound is passed.
    """
    by_layer: dict[int, list[ResolvedIntervention]] = {}
    for item in plan.interventions:
        if item.op in ("add", "affine", "mul"):  # an ablation is a projection; sara becomes mul in vsteer.LLM
            for layer in item.layers:
                by_layer.setdefault(layer, []).append(item)
    gain, shift = 1.0, 0.0
    for layer in sorted(by_layer):
        g, s = 1.0, 0.0
        peak = 1.0
        for item in by_layer[layer]:
            tensor = _layer_tensor(vectors(item.vector), layer).to(torch.float64)
            if item.op == "add":
                rows = tensor if tensor.ndim == 2 else tensor[None]
                s += abs(item.scale) * float(rows.norm(dim=-1).max())
            elif item.op == "affine":
                A, B, b = split_affine(tensor)
                k = 1.0 + abs(item.scale) * float(A.norm()) * float(B.norm())
                g, s = g * k, s * k + abs(item.scale) * float(b.norm())
            elif item.op == "mul":
                k = float(tensor.abs().max())
                g, s = g * k, s * k
            if item.schedule is not None and item.schedule[0] == "linear":  # exp and window stay in [0, 1]
                peak = max(peak, abs(item.schedule[1]), abs(item.schedule[2]))
        # h + peak * (h' - h): gain <= 1 + peak (g + 1), shift <= peak s
        if peak != 1.0:
            g, s = 1.0 + peak * (g + 1.0), peak * s
        gain, shift = gain * g, shift * g + s
        if not (gain <= limit and shift <= limit):
            raise SpecError(f"the steering at layers up to {layer} can grow the residual by a factor of {gain:.3g} "
                            f"and add {shift:.3g} (norm), past this engine's bound {limit:.3g}", field="interventions")


class StagedStore:
    """A vector store view that keeps the vectors ``put`` during validation in memory and writes
    them only on :meth:`commit` (nothing is stored for a request that fails a check)."""

    def __init__(self, store: VectorStore) -> None:
        self.base = store
        self.root = store.root
        self.staged: dict[str, SteeringVector] = {}

    def put(self, vector: SteeringVector) -> str:
        sha = vector.sha256
        if sha not in self.base:
            self.staged.setdefault(sha, vector)
        return sha

    def get(self, sha: str) -> SteeringVector:
        return self.staged[sha] if sha in self.staged else self.base.get(sha)

    def __contains__(self, sha: object) -> bool:
        return sha in self.staged or sha in self.base

    def names(self) -> dict[str, str]:
        return self.base.names()

    def resolve(self, ref: str) -> str:
        return self.base.resolve(ref)

    def commit(self) -> frozenset[str]:
        """Write the staged vectors; returns the hashes this call newly stored."""
        created = set()
        for sha, vector in self.staged.items():
            if sha not in self.base:
                self.base.put(vector)
                created.add(sha)
        self.staged.clear()
        return frozenset(created)


@dataclass(frozen=True)
class ModelShape:
    """What validation needs to know about the model."""

    name: str
    num_layers: int
    hidden_size: int


def resolve_spec(
    spec: object,
    *,
    store: VectorStore,
    model: ModelShape,
    steerable_layers: Sequence[int] | None = None,
    max_ablation_rank: int = 1,
    max_slots: int | None = None,
    max_abs_scale: float = DEFAULT_MAX_ABS_SCALE,
    allow_paths: bool = True,
    saes: Mapping[str, "SparseAutoencoder"] | None = None,
    sae_store: "SaeStore | None" = None,
    max_sas_support: int | None = None,
    condition_layers: Sequence[int] | None = None,
    max_conditions: int | None = None,
    max_interventions: int | None = None,
    magnitude: float | None = None,
    created: set[str] | None = None,
    check: Callable[["SteeringPlan", Callable[[str], SteeringVector]], None] | None = None,
) -> SteeringPlan | None:
    """Validate a steering request and resolve its vectors into the store.

    Args:
        spec: anything ``parse_spec`` accepts (None means unsteered).
        store: where resolved vectors are put, by content hash.
        model: layer count and hidden size to check against.
        steerable_layers: the layers the engine wrapped (default: all).
        max_ablation_rank: the engine's bank rank.
        max_slots: the engine's slot capacity (a request needing more is refused).
        max_abs_scale: bound on |scale|.
        allow_paths: whether a vector may be named by a file path (a server must say no: its
            clients name stored vectors, never files on the server).
        saes: the SAEs loaded in the engine, by name (``sas`` ops must name one of them).
        sae_store: where ``sae:<name>/<feature>`` references look for SAEs the engine did not load.
        max_sas_support: the engine's bound on the features one SAS layer touches per step.
        condition_layers: the layers where the engine pools prompts for conditions (None: any).
        max_conditions: the engine's bound on conditions (and on distinct gates) per request.
        max_interventions: bound on the request's interventions (None: no bound).
        magnitude: bound of :func:`check_magnitudes` (default: :func:`magnitude_limit` of float32).
        created: if given, receives the hashes of vectors this call newly wrote to ``store``.
        check: a further check of the resolved plan (and a reader of its vectors), run before
            anything is written.

    Vectors are written to ``store`` only once every check has passed.

    Raises:
        SpecError: naming the bad field.
    """
    parsed: SteeringSpec | None = parse_spec(spec)
    if parsed is None:
        return None
    if max_interventions is not None and len(parsed.interventions) > max_interventions:
        raise SpecError(f"{len(parsed.interventions)} interventions; this server takes at most {max_interventions}",
                        field="interventions")
    parsed.check_scales(max_abs_scale)
    store = StagedStore(store)
    allowed = set(range(model.num_layers)) if steerable_layers is None else set(steerable_layers)
    out = []
    for i, item in enumerate(parsed.interventions):
        field = f"interventions.{i}"
        if isinstance(item, SasOp):
            out.append(_resolve_sas(item, field, saes or {}, store, model, allowed, allow_paths, max_sas_support))
            continue
        if isinstance(item, SaraOp):
            _check_layers(item.layers or [], model, allowed, f"{field}.layers")
            if not item.layers:
                raise SpecError("sara needs 'layers' with exactly one layer", field=f"{field}.layers")
            source = _sara_source(item, field)
            out.append(ResolvedIntervention("sara", source, tuple(item.layers), item.scale, item.positions, False))
            continue
        vector = _load_ref(
            item.vector, item.layers, store=store, field=f"{field}.vector", allow_paths=allow_paths,
            saes=saes, sae_store=sae_store,
        )
        if vector.hidden_size != model.hidden_size:
            raise SpecError(
                f"vector has hidden size {vector.hidden_size} but {model.name} has {model.hidden_size}",
                field=f"{field}.vector",
            )
        if vector.model is not None and vector.model != model.name:
            raise SpecError(
                f"vector was computed for model {vector.model!r}, not {model.name!r}",
                field=f"{field}.vector",
            )
        if isinstance(item, AffineOp):
            out.append(_resolve_affine(item, vector, field, store, model, allowed))
            continue
        if vector.num_positions is not None and not isinstance(item, AddOp):
            raise SpecError("a per-position vector can only be added", field=f"{field}.op")
        layers = tuple(item.layers) if item.layers is not None else tuple(sorted(vector.layers))
        _check_layers(layers, model, allowed, f"{field}.layers")
        for layer in layers:
            direction = _at_layer(_direction, vector, layer, field)
            if isinstance(item, AblateOp) and float(direction.norm()) == 0.0:
                raise SpecError(f"cannot ablate a zero direction at layer {layer}", field=f"{field}.vector")
        sha = store.put(vector)
        if isinstance(item, AddOp):
            rows = vector.num_positions or 0
            out.append(ResolvedIntervention("add", sha, layers, item.scale, item.positions, item.normalize, rows,
                                            schedule=_schedule_of(item)))
        else:
            out.append(ResolvedIntervention("ablate", sha, layers, 1.0, item.positions, False))
    out = [
        replace(r, when=_resolve_when(item.when, f"interventions.{i}.when", store, model, allow_paths, saes, sae_store,
                                      condition_layers))
        if getattr(item, "when", None) is not None else r
        for i, (r, item) in enumerate(zip(out, parsed.interventions))
    ]
    plan = SteeringPlan(tuple(out))
    _check_sas_first(plan)
    check_schedules(plan)
    check_gates(plan, condition_layers, max_conditions)
    ranks: Counter[int] = Counter()
    for item in plan.interventions:
        if item.op in ("ablate", "affine"):
            for layer in item.layers:
                ranks[layer] += affine_rank(store.get(item.vector), layer) if item.op == "affine" else 1
    worst = max(ranks.items(), key=lambda kv: kv[1], default=(None, 0))
    if worst[1] > max_ablation_rank:
        raise SpecError(
            f"{worst[1]} ablations at layer {worst[0]} exceed the engine's max_ablation_rank="
            f"{max_ablation_rank}",
            field="interventions",
        )
    needed = plan.max_slots_needed() if max_slots is not None else 0
    if max_slots is not None and needed > max_slots:
        raise SpecError(
            f"the request needs {needed} steering slots at once but the engine "
            f"has {max_slots} (raise max_slots or use fewer distinct position ranges)",
            field="interventions",
        )
    check_magnitudes(plan, store.get, magnitude_limit() if magnitude is None else magnitude)
    if check is not None:
        check(plan, store.get)
    new = store.commit()
    if created is not None:
        created.update(new)
    return plan


def _resolve_sas(
    item: SasOp,
    field: str,
    saes: Mapping[str, "SparseAutoencoder"],
    store: VectorStore,
    model: ModelShape,
    allowed: set[int],
    allow_paths: bool,
    max_sas_support: int | None,
) -> ResolvedIntervention:
    sae = saes.get(item.sae)
    if sae is None:
        raise SpecError(
            f"SAE {item.sae!r} is not loaded in this engine (loaded: {sorted(saes)}); start the "
            "engine with saes=[...] (`vsteer serve --sae ...`)",
            field=f"{field}.sae",
        )
    layer = sae.layer
    if item.layers is not None and list(item.layers) != [layer]:
        raise SpecError(f"sas acts at its SAE's layer {layer}, not {item.layers}", field=f"{field}.layers")
    _check_layers([layer], model, allowed, f"{field}.sae")
    vector = _load_ref(item.vector, [layer], store=store, field=f"{field}.vector", allow_paths=allow_paths)
    if vector.hidden_size != sae.d_sae:
        raise SpecError(
            f"sas vector has {vector.hidden_size} features but SAE {item.sae!r} has d_sae={sae.d_sae}",
            field=f"{field}.vector",
        )
    if vector.num_positions is not None:
        raise SpecError("a sas vector is one SAE-space vector, not per-position rows", field=f"{field}.vector")
    if vector.model is not None and vector.model != model.name:
        raise SpecError(f"vector was computed for model {vector.model!r}, not {model.name!r}", field=f"{field}.vector")
    try:
        s = _direction(vector, layer)
    except SpecError as exc:
        raise SpecError(exc.reason, field=f"{field}.vector") from exc
    support = int((s != 0).sum())
    if support == 0:
        raise SpecError("sas vector is all zeros", field=f"{field}.vector")
    if sae.activation == "topk":
        support = 0  # TopK encodes every feature anyway; nothing to budget
    elif max_sas_support is not None and support > max_sas_support:
        raise SpecError(
            f"sas vector has {support} non-zero features but the engine's max_sas_support is "
            f"{max_sas_support} (raise it, or sparsify the vector, e.g. a higher tau)",
            field=f"{field}.vector",
        )
    sha = store.put(vector)
    return ResolvedIntervention(
        "sas", sha, (layer,), item.scale, item.positions, False, 0, sae=item.sae, support=support, width=sae.d_sae
    )


def affine_rank(vector: SteeringVector, layer: int) -> int:
    """r of an affine file's ``[2r + 1, d]`` tensor at ``layer``."""
    return (int(_layer_tensor(vector, layer).shape[0]) - 1) // 2


def split_affine(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A [r, d], B [r, d], b [d])`` of one layer's ``[2r + 1, d]`` affine tensor."""
    r = (tensor.shape[0] - 1) // 2
    return tensor[:r], tensor[r : 2 * r], tensor[2 * r]


def check_affine_shape(tensor: torch.Tensor, layer: int, field: str) -> None:
    """Refuse an affine tensor that is not ``[2r + 1, d]`` (A, B and b stacked), naming ``field``."""
    if tensor.ndim != 2 or tensor.shape[0] % 2 != 1 or tensor.shape[0] < 3:
        raise SpecError(f"an affine file stacks A [r, d], B [r, d] and b [d] as [2r + 1, d]; layer {layer} has "
                        f"shape {list(tensor.shape)}", field=field)


def _at_layer(get: Callable[[SteeringVector, int], torch.Tensor], vector: SteeringVector, layer: int,
              field: str) -> torch.Tensor:
    """``get(vector, layer)``, its SpecError naming ``{field}.layers``."""
    try:
        return get(vector, layer)
    except SpecError as exc:
        raise SpecError(exc.reason, field=f"{field}.layers") from exc


def _layer_tensor(vector: SteeringVector, layer: int) -> torch.Tensor:
    """The vector's tensor at ``layer``; a one-layer vector applies wherever the request says."""
    if layer in vector.layers:
        return vector.layers[layer]
    if len(vector.layers) == 1:
        return next(iter(vector.layers.values()))
    raise SpecError(f"vector has no tensor for layer {layer} (it has {sorted(vector.layers)})")


def _resolve_affine(item: "AffineOp", vector: SteeringVector, field: str, store: VectorStore, model: "ModelShape",
                    allowed: set[int]) -> ResolvedIntervention:
    layers = tuple(item.layers) if item.layers is not None else tuple(sorted(vector.layers))
    _check_layers(layers, model, allowed, f"{field}.layers")
    for layer in layers:
        check_affine_shape(_at_layer(_layer_tensor, vector, layer, field), layer, f"{field}.vector")
    return ResolvedIntervention("affine", store.put(vector), layers, item.scale, item.positions, False,
                                schedule=_schedule_of(item))


_SCHEDULE = TypeAdapter(Schedule)


def _schedule_of(item: "AddOp | AffineOp") -> tuple | None:
    return schedules.as_tuple(item.schedule.model_dump(by_alias=True)) if item.schedule is not None else None


def parse_schedule(data: object) -> tuple | None:
    """A plan's JSON schedule (None when absent), checked like a spec's.

    Raises:
        SpecError: a malformed schedule.
    """
    if data is None:
        return None
    return schedules.as_tuple(_validated(_SCHEDULE.validate_python, data, "schedule").model_dump(by_alias=True))


def _validated(validate: Callable[[object], object], data: object, field: str) -> Any:
    """``validate(data)``, a ValidationError turned into a SpecError naming ``field``."""
    try:
        return validate(data)
    except ValidationError as exc:
        raise SpecError(f"bad {field}: {exc.errors()[0]['msg']}", field=field) from exc


def _check_one_per_layer(plan: SteeringPlan, attr: str, what: str) -> None:
    """At each layer, every edit other than sas carries the same ``attr`` (or none): it multiplies
    the layer's composed change."""
    first: dict[int, tuple[int, tuple | None]] = {}
    for i, item in enumerate(plan.interventions):
        if item.op == "sas":
            continue
        value = getattr(item, attr)
        for layer in item.layers:
            j, seen = first.setdefault(layer, (i, value))
            if seen != value:
                raise SpecError(
                    f"interventions {j} and {i} act at layer {layer} with different {what}s; the edits at "
                    f"one layer share one {what} (it multiplies the layer's composed change)",
                    field=f"interventions.{i}.{attr}",
                )


def check_schedules(plan: SteeringPlan) -> None:
    """A schedule scales its layer's composed change, so at a layer every edit other than sas must
    carry the same schedule (or none), and only add (without normalize) and affine carry one.

    Raises:
        SpecError: naming the intervention that breaks this.
    """
    for i, item in enumerate(plan.interventions):
        if item.schedule is not None and (item.op not in ("add", "affine") or item.normalize):
            raise SpecError(f"schedule is supported on add (without normalize) and affine, not on {item.op!r}",
                            field=f"interventions.{i}.schedule")
    _check_one_per_layer(plan, "schedule", "schedule")


def when_to_json(when: tuple) -> dict:
    """The JSON form of a resolved gate."""
    combine, conditions = when
    return {"combine": combine, "conditions": [
        {"vector": sha, "layer": layer, "threshold": thr, "compare": compare, "pool": pool}
        for sha, layer, thr, compare, pool in conditions]}


def parse_when(data: object) -> tuple | None:
    """A plan's JSON gate (None when absent), checked like a spec's.

    Raises:
        SpecError: a malformed gate.
    """
    if data is None:
        return None
    parsed = _validated(ConditionSet.model_validate, data, "when")
    for cond in parsed.conditions:
        if not isinstance(cond.vector, str) or len(cond.vector) != 64:
            raise SpecError("a resolved condition names its vector by sha256", field="when.conditions")
    return _when_tuple(parsed, [c.vector for c in parsed.conditions])


def _when_tuple(when: ConditionSet, shas: Sequence[str]) -> tuple:
    return (when.combine, tuple((sha, c.layer, float(c.threshold), c.compare, c.pool)
                                for sha, c in zip(shas, when.conditions)))


def _resolve_when(when: "Condition | ConditionSet", field: str, store: VectorStore, model: ModelShape,
                  allow_paths: bool, saes: Mapping[str, "SparseAutoencoder"] | None,
                  sae_store: "SaeStore | None", condition_layers: Sequence[int] | None) -> tuple:
    """Resolve a spec's gate: each condition vector into the store, checked at its layer."""
    single = isinstance(when, Condition)
    conditions = ConditionSet(conditions=[when]) if single else when
    shas = []
    for k, cond in enumerate(conditions.conditions):
        where = field if single else f"{field}.conditions.{k}"
        if not 0 <= cond.layer < model.num_layers:
            raise SpecError(f"layer {cond.layer} is out of range: {model.name} has layers 0..{model.num_layers - 1}",
                            field=f"{where}.layer")
        if condition_layers is not None and cond.layer not in condition_layers:
            raise SpecError(f"layer {cond.layer} is not a condition layer of this engine (condition layers: "
                            f"{sorted(condition_layers)}); start it with condition_layers including {cond.layer}",
                            field=f"{where}.layer")
        vector = _load_ref(cond.vector, [cond.layer], store=store, field=f"{where}.vector", allow_paths=allow_paths,
                           saes=saes, sae_store=sae_store)
        if vector.hidden_size != model.hidden_size:
            raise SpecError(f"condition vector has hidden size {vector.hidden_size} but {model.name} has "
                            f"{model.hidden_size}", field=f"{where}.vector")
        if vector.model is not None and vector.model != model.name:
            raise SpecError(f"vector was computed for model {vector.model!r}, not {model.name!r}", field=f"{where}.vector")
        if vector.num_positions is not None:
            raise SpecError("a condition vector is one direction, not per-position rows", field=f"{where}.vector")
        try:
            direction = _direction(vector, cond.layer)
        except SpecError as exc:
            raise SpecError(exc.reason, field=f"{where}.vector") from exc
        if not bool(torch.isfinite(direction).all()) or float(direction.norm()) == 0.0:
            raise SpecError(f"condition vector is zero or not finite at layer {cond.layer}", field=f"{where}.vector")
        shas.append(store.put(vector))
    return _when_tuple(conditions, shas)


def check_gates(plan: SteeringPlan, condition_layers: Sequence[int] | None = None,
                max_conditions: int | None = None) -> None:
    """A gate multiplies its layer's composed change, so at a layer every edit other than sas carries
    the same gate (or none); sas carries none. Condition layers must be the engine's, and a request
    has at most ``max_conditions`` conditions and as many distinct gates.

    Raises:
        SpecError: naming the intervention that breaks this.
    """
    _check_one_per_layer(plan, "when", "gate")
    for i, item in enumerate(plan.interventions):
        if item.op == "sas" and item.when is not None:
            raise SpecError("when (conditional steering) is not supported on sas", field=f"interventions.{i}.when")
        if item.when is not None and condition_layers is not None:
            bad = sorted({c[1] for c in item.when[1]} - set(condition_layers))
            if bad:
                raise SpecError(
                    f"layer {bad[0]} is not a condition layer of this engine (condition layers: "
                    f"{sorted(condition_layers)}); start it with condition_layers including {bad[0]}",
                    field=f"interventions.{i}.when",
                )
    gates = plan.gates()
    count = sum(len(g[1]) for g in gates)
    if max_conditions is not None and max(count, len(gates)) > max_conditions:
        raise SpecError(f"the request has {count} conditions in {len(gates)} gates; the engine takes at most "
                        f"max_conditions={max_conditions} of each", field="interventions")


def _check_sas_first(plan: SteeringPlan) -> None:
    """At one layer the engine applies sas before the affine ops; refuse a spec that says otherwise."""
    affine_seen: set[int] = set()
    for i, item in enumerate(plan.interventions):
        if item.op == "sas":
            if item.layers[0] in affine_seen:
                raise SpecError(
                    f"sas at layer {item.layers[0]} must come before the add/ablate/sara ops at that "
                    "layer (the engine applies it to the layer output first)",
                    field=f"interventions.{i}",
                )
        else:
            affine_seen.update(item.layers)


def _check_layers(layers: Sequence[int], model: ModelShape, allowed: set[int], field: str) -> None:
    for layer in layers:
        if not 0 <= layer < model.num_layers:
            raise SpecError(
                f"layer {layer} is out of range: {model.name} has layers 0..{model.num_layers - 1}",
                field=field,
            )
        if layer not in allowed:
            raise SpecError(f"layer {layer} is not steerable in this engine (steerable: {sorted(allowed)})", field=field)


def _sara_source(item: SaraOp, field: str) -> str:
    """A JSON key naming where a SARA set comes from (a saved file, or attract/repel texts)."""
    if item.vector is not None:
        if not isinstance(item.vector, str) or not Path(item.vector).expanduser().is_file():
            raise SpecError(f"no saved SARA set at {item.vector!r}", field=f"{field}.vector")
        return json.dumps({"path": str(Path(item.vector).expanduser().resolve())})
    return json.dumps({"attract": item.attract, "repel": item.repel})


def _load_ref(
    ref: str | list[float],
    layers: list[int] | None,
    *,
    store: VectorStore,
    field: str,
    allow_paths: bool = True,
    saes: Mapping[str, "SparseAutoencoder"] | None = None,
    sae_store: "SaeStore | None" = None,
) -> SteeringVector:
    """A vector from an inline list, a name or sha256 in the store, an SAE decoder row
    (``sae:<name>/<feature>``), or (if allowed) a file path."""
    if isinstance(ref, str) and ref.startswith(SAE_FEATURE_PREFIX):
        return _sae_feature_vector(ref, saes or {}, sae_store, field)
    if isinstance(ref, list):
        if layers is None:
            raise SpecError("an inline vector needs explicit 'layers'", field=field.rsplit(".", 1)[0] + ".layers")
        return SteeringVector.from_tensors({layers[0]: ref}, method="inline")
    stored = ref in store.names() or (len(ref) == 64 and ref in store)
    if not stored and not allow_paths:
        raise SpecError(
            f"unknown vector {ref!r}: give a stored name or sha256, or an inline list (this server does not read files)",
            field=field,
        )
    try:
        if stored:
            return store.get(store.resolve(ref))
        path = Path(ref).expanduser()
        if path.is_file():
            return load_vector(path)
    except (VectorFileError, ValueError) as exc:
        raise SpecError(f"cannot load vector {ref!r}: {exc}", field=field) from exc
    raise SpecError(
        f"unknown vector {ref!r}: not a registered name, a stored sha256, or an existing file",
        field=field,
    )


def _sae_feature_vector(
    ref: str, saes: Mapping[str, "SparseAutoencoder"], sae_store: "SaeStore | None", field: str
) -> SteeringVector:
    """``sae:<name>/<feature>``: the SAE's decoder row for that feature, at the SAE's layer."""
    body = ref[len(SAE_FEATURE_PREFIX):]
    name, sep, feature_text = body.rpartition("/")
    if not sep or not name or not feature_text.strip().isdigit():
        raise SpecError(f"malformed SAE feature reference {ref!r}; expected 'sae:<sae name>/<feature index>'", field=field)
    sae = saes.get(name)
    if sae is None and sae_store is not None:
        from vsteer._errors import SaeFileError

        try:
            sae = sae_store.get(name)
        except SaeFileError as exc:
            raise SpecError(f"unknown SAE {name!r} in {ref!r}: {exc}", field=field) from exc
    if sae is None:
        raise SpecError(f"unknown SAE {name!r} in {ref!r} (known: {sorted(saes)})", field=field)
    feature = int(feature_text)
    if not 0 <= feature < sae.d_sae:
        raise SpecError(f"feature {feature} is out of range: SAE {name!r} has features 0..{sae.d_sae - 1}", field=field)
    if sae.layer is None:
        raise SpecError(f"SAE {name!r} does not record the layer it reads", field=field)
    return SteeringVector(
        {sae.layer: sae.feature_direction(feature).float()},
        hidden_size=sae.d_in,
        model=sae.config.model,
        method="sae-feature",
        provenance={"sae": name, "sae_sha256": sae.sha256(), "feature": feature},
    )
