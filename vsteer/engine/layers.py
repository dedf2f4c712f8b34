"""Wrapping vLLM decoder layers so they apply per-token slot steering.

Each steerable layer's ``__class__`` is swapped, once at load and before torch.compile traces the
model, for a subclass whose ``forward`` calls the original and then applies the slot bank row of
every token to the residual stream (forward hooks would be dropped by torch.compile). All wrapped
layers share one per-token slot index; each owns a view of one stacked bank. Nothing in forward
branches on data: the graph vLLM traces (and CUDA graphs replay) reads the buffers' contents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple

import torch
from torch import nn

from vsteer._errors import UnsupportedArchitectureError
from vsteer.engine.gate_layers import ConditionLayer, GateBuffers, attach_gates, gate_buffers
from vsteer.kernels import BankLayout, get_sas_backend, get_steer_backend, sae_activate

if TYPE_CHECKING:
    from vsteer.sae import SparseAutoencoder

#: Decoder layers returning ``(hidden, residual)`` whose sum is the residual stream.
PAIR_LAYERS = frozenset(
    {
        "LlamaDecoderLayer",
        "MistralDecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen3DecoderLayer",
        "GemmaDecoderLayer",
        "Gemma2DecoderLayer",
        "Gemma3DecoderLayer",
    }
)
#: Blocks returning the residual stream itself (GPT-2 style).
SINGLE_LAYERS = frozenset({"GPT2Block"})

_VLLM_MODELS = "vllm.model_executor.models."
_LAYER_PATHS = ("model.layers", "transformer.h", "language_model.model.layers", "model.language_model.layers")


class StepActivity:
    """Which wrapped layers any token of the current step steers or captures (host side).

    Only eager engines read it: with no traced graph and no CUDA graph, a layer can skip the op
    when the step does not use it. Compiled engines always run the branch-free op.
    """

    def __init__(self) -> None:
        self.steer: frozenset[int] = frozenset()
        self.capture: bool = False
        self.sas_len: dict[int, int] = {}  # SAS layer -> size of the step's feature union
        self.accumulate: bool = False  # some token of the step adds to an effect row
        self.scaled: bool = False  # some token of the step has a schedule's multiplier
        self.gated: bool = False  # some token of the step has a gate (conditional steering)
        self.pooling: bool = False  # some gated prompt token is pooled at the condition layers
        self.finalizing: bool = False  # some gated request's prompt ends: its conditions are decided


class _SasDelta:
    """The SAS change at this layer (DESIGN.md section 5), float32, for layers with an SAE.

    ReLU/JumpReLU read only the features in ``_vsteer_sas_union`` (the step's union of supports,
    padded with the zero column ``d_sae``); compiled engines use the whole fixed-size union
    buffer, eager ones the step's length, or every feature once the union covers half of them
    (then reading all rows in order is cheaper than gathering). TopK encodes every feature.
    """

    def _vsteer_sas_delta(self, stream: torch.Tensor, n: int) -> torch.Tensor:
        union = self._vsteer_sas_union
        if union is not None and self._vsteer_eager:
            size = self._vsteer_activity.sas_len.get(self._vsteer_layer, 0)
            # past half the features, reading every row in order beats gathering the union's rows
            union = union[:size] if 2 * size < self._vsteer_sas_bank.shape[1] else None
        return self._vsteer_sas_fn(
            stream, self._vsteer_index[:n], self._vsteer_sas_bank, self._vsteer_sas_w_enc_t,
            self._vsteer_sas_b_enc, self._vsteer_sas_w_dec, self._vsteer_sas_threshold, union,
            activation=self._vsteer_sas_activation, k=self._vsteer_sas_k,
        )


class _EffectSums:
    """Feature-effect accumulation (DESIGN.md section 6) for layers whose SAE measures effects:
    ``sums[row] += f(h)`` for every token, ``h`` the residual BEFORE this layer's steering, ``row``
    the token's effect row (0 = not measured; its sums are never read). Full encode: effects
    are read over every feature."""

    def _vsteer_accumulate(self, stream: torch.Tensor, n: int) -> None:
        if self._vsteer_eager and not self._vsteer_activity.accumulate:
            return
        f = self._vsteer_acc_features
        pre = stream.float() @ self._vsteer_sas_w_enc_t[:f].t() + self._vsteer_sas_b_enc[:f]
        threshold = self._vsteer_sas_threshold[:f] if self._vsteer_sas_threshold is not None else None
        codes = sae_activate(pre, self._vsteer_sas_activation, threshold, self._vsteer_sas_k)
        self._vsteer_acc_sums.index_add_(0, self._vsteer_acc_index[:n], codes)


class _PreSteer(_SasDelta, _EffectSums, ConditionLayer):
    """What a layer does with its output before the slot op: capture it, sum its SAE codes, pool
    gated prompts, and return the SAS change (None where the layer has no SAS). Which of these a
    layer does is fixed when it is wrapped, so the branches below are static for torch.compile."""

    def _vsteer_step_scale(self, n: int) -> torch.Tensor | None:
        """The per-token multipliers of this layer's change (schedules times gates). Compiled
        engines always read them (all ones when nothing is scheduled or gated); eager ones only on
        steps that need them."""
        scale = None if self._vsteer_eager and not self._vsteer_activity.scaled else self._vsteer_scale[:n]
        return self._vsteer_gate_scale(scale, n)

    def _vsteer_pre(self, stream: torch.Tensor, n: int) -> torch.Tensor | None:
        if self._vsteer_capture is not None:
            self._vsteer_capture[:n].copy_(stream)
        if self._vsteer_pool_sum is not None:
            self._vsteer_conditions(stream, n)
        if self._vsteer_acc_sums is not None:
            self._vsteer_accumulate(stream, n)
        return self._vsteer_sas_delta(stream, n) if self._vsteer_sas_activation is not None else None


class _SteeredPair(_PreSteer):
    """Mixin for ``(hidden, residual)`` layers: steer the returned residual, out of place."""

    def forward(self, *args, **kwargs):
        hidden, residual = super().forward(*args, **kwargs)
        n = hidden.shape[0]
        if self._vsteer_reads_stream:
            delta = self._vsteer_pre(hidden + residual, n)  # the stream is summed once
            if delta is not None:
                residual = (residual.float() + delta).to(residual.dtype)
        residual = self._vsteer_apply(hidden, residual, self._vsteer_bank, self._vsteer_index[:n], rank=self._vsteer_rank,
                                      scale=self._vsteer_step_scale(n))
        return hidden, residual


class _SteeredSingle(_PreSteer):
    """Mixin for blocks that return the residual stream itself."""

    def forward(self, *args, **kwargs):
        hidden = super().forward(*args, **kwargs)
        n = hidden.shape[0]
        if self._vsteer_reads_stream:
            delta = self._vsteer_pre(hidden, n)
            if delta is not None:
                hidden = (hidden.float() + delta).to(hidden.dtype)
        return self._vsteer_apply(hidden, None, self._vsteer_bank, self._vsteer_index[:n], rank=self._vsteer_rank,
                                  scale=self._vsteer_step_scale(n))


class _SkipUnusedLayer:
    """Eager-only: skip the steering op on steps that neither steer nor capture this layer.

    Put ahead of the steered mixin; ``_vsteer_mixin`` (set on the built class) names it, so the
    skip path calls the original layer's forward directly.
    """

    def forward(self, *args, **kwargs):
        act = self._vsteer_activity
        if (
            self._vsteer_layer in act.steer
            or (act.capture and self._vsteer_capture is not None)
            or (act.accumulate and self._vsteer_acc_sums is not None)
            or (act.pooling and self._vsteer_pool_sum is not None)
        ):
            return super().forward(*args, **kwargs)
        return super(self._vsteer_mixin, self).forward(*args, **kwargs)


_WRAPPED_CLASSES: dict[tuple[type, bool], type] = {}


def _steered_class(cls: type, eager: bool) -> type:
    if (cls, eager) not in _WRAPPED_CLASSES:
        mixin = _SteeredPair if cls.__name__ in PAIR_LAYERS else _SteeredSingle
        bases = (_SkipUnusedLayer, mixin, cls) if eager else (mixin, cls)
        _WRAPPED_CLASSES[(cls, eager)] = type(f"Steered{cls.__name__}", bases, {"_vsteer_mixin": mixin})
    return _WRAPPED_CLASSES[(cls, eager)]


def find_decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Return {layer index: module} for the decoder layers present on this rank.

    Raises:
        UnsupportedArchitectureError: if no known decoder-layer list is found.
    """
    for path in _LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            classes = {type(m) for m in obj if type(m).__name__ != "PPMissingLayer"}
            # Match vLLM's own implementations only: HF classes of the same name (vLLM's
            # Transformers backend, remote code) return a different tuple.
            unknown = {
                f"{c.__module__}.{c.__name__}"
                for c in classes
                if c.__name__ not in PAIR_LAYERS | SINGLE_LAYERS or not c.__module__.startswith(_VLLM_MODELS)
            }
            if unknown:
                raise UnsupportedArchitectureError(
                    f"architecture not supported: decoder layer class {sorted(unknown)[0]} of "
                    f"{type(model).__name__} is not one vsteer can wrap (supported: vLLM's "
                    f"{sorted(PAIR_LAYERS | SINGLE_LAYERS)})"
                )
            return {i: m for i, m in enumerate(obj) if type(m).__name__ != "PPMissingLayer"}
    raise UnsupportedArchitectureError(
        f"architecture not supported: cannot find the decoder layers of {type(model).__name__} "
        f"(looked for {', '.join(_LAYER_PATHS)})"
    )


class SasBuffers(NamedTuple):
    """One SAE layer's SAS state: weights padded with a zero feature ``d_sae``, the per-slot bank
    of ``lambda * s`` and the step's feature union (None for TopK)."""

    d_sae: int
    bank: torch.Tensor  # [num_slots + 1, d_sae + 1] float32; column d_sae stays zero
    union: torch.Tensor | None  # [max_support] int64, padded with d_sae
    effect_sums: torch.Tensor | None  # [effect_rows + 1, d_sae] float32 (effect layers only)


class SteeringBuffers(NamedTuple):
    """Device buffers shared by the wrapped layers (allocated once)."""

    layers: tuple[int, ...]  # wrapped decoder layer ids, in bank order
    bank: torch.Tensor  # [len(layers), num_slots + 1, W] float32
    index: torch.Tensor  # [max_tokens] int32 slot per token; slot 0 = identity
    capture: dict[int, torch.Tensor]  # layer -> [max_tokens, hidden] in the model dtype
    activity: StepActivity  # read by eager layers only
    sas: dict[int, SasBuffers]  # SAE layer -> its SAS state
    effect_index: torch.Tensor  # [max_tokens] int64 effect row per token; 0 = not measured
    scale: torch.Tensor  # [len(layers), max_tokens] float32 multiplier of each token's change (schedules)
    gates: GateBuffers | None  # conditional steering (None: the engine has no condition layers)


def wrap_decoder_layers(
    model: nn.Module,
    *,
    layout: BankLayout,
    num_slots: int,
    max_tokens: int,
    steerable_layers: list[int] | None,
    capture_layers: list[int] | None,
    device: torch.device,
    dtype: torch.dtype,
    eager: bool = False,
    saes: Mapping[int, "SparseAutoencoder"] | None = None,
    max_sas_support: int = 1024,
    effect_layers: frozenset[int] = frozenset(),
    effect_rows: int = 0,
    condition_layers: frozenset[int] = frozenset(),
    gate_rows: int = 0,
    max_conditions: int = 2,
) -> SteeringBuffers:
    """Swap each steerable decoder layer's class for its steered subclass; return the buffers.

    Mutates ``model`` in place. ``num_slots`` excludes the identity slot 0. ``eager`` (no
    torch.compile, no CUDA graphs) lets layers skip the op on steps that do not use them.
    ``saes`` (layer -> SAE) gives those layers the SAS op, touching at most ``max_sas_support``
    features per step (ReLU/JumpReLU). ``effect_layers`` (a subset of the SAE layers) also sum
    the SAE codes of each token into its effect row (``effect_rows`` rows besides row 0).
    ``condition_layers`` pool the prompts of up to ``gate_rows`` gated requests for their
    conditions (at most ``max_conditions`` each; :mod:`vsteer.engine.gate_layers`).
    """
    present = find_decoder_layers(model)
    wanted = sorted(present) if steerable_layers is None else sorted(set(steerable_layers) & set(present))
    captured = set(wanted) if capture_layers is None else set(capture_layers) & set(wanted)
    bank = layout.identity_bank(len(wanted) * (num_slots + 1), device=device).view(len(wanted), num_slots + 1, layout.width)
    index = torch.zeros(max_tokens, dtype=torch.int32, device=device)
    scale = torch.ones(len(wanted), max_tokens, dtype=torch.float32, device=device)
    capture = {layer: torch.zeros(max_tokens, layout.hidden_size, dtype=dtype, device=device) for layer in sorted(captured)}
    apply = get_steer_backend(device)
    activity = StepActivity()
    saes = dict(saes or {})
    missing = sorted(set(saes) - set(wanted))
    if missing:
        raise ValueError(f"SAE layers {missing} are not steerable layers of this engine")
    if not set(effect_layers) <= set(saes):
        raise ValueError(f"effect layers {sorted(set(effect_layers) - set(saes))} have no SAE")
    if not set(condition_layers) <= set(wanted):
        raise ValueError(f"condition layers {sorted(set(condition_layers) - set(wanted))} are not steerable layers")
    gates = gate_buffers(rows=gate_rows, k=max_conditions, hidden=layout.hidden_size, layers=len(wanted),
                         max_tokens=max_tokens, condition_layers=sorted(condition_layers),
                         device=device) if condition_layers else None
    sas_state: dict[int, SasBuffers] = {}
    effect_index = torch.zeros(max_tokens, dtype=torch.int64, device=device)
    for row, layer in enumerate(wanted):
        module = present[layer]
        module.__class__ = _steered_class(type(module), eager)
        module._vsteer_layer = layer
        module._vsteer_activity = activity
        module.register_buffer("_vsteer_bank", bank[row], persistent=False)
        module.register_buffer("_vsteer_index", index, persistent=False)
        module.register_buffer("_vsteer_scale", scale[row], persistent=False)
        if layer in capture:
            module.register_buffer("_vsteer_capture", capture[layer], persistent=False)
        else:
            module._vsteer_capture = None
        module._vsteer_rank = layout.rank
        module._vsteer_apply = apply
        module._vsteer_eager = eager
        module._vsteer_sas_activation = None
        attach_gates(module, gates, layer, row)
        if layer not in effect_layers:
            module._vsteer_acc_sums = None
        if layer in saes:
            sas_state[layer] = _attach_sae(module, saes[layer], num_slots, max_sas_support, device)
            if layer in effect_layers:
                sums = torch.zeros(effect_rows + 1, saes[layer].d_sae, dtype=torch.float32, device=device)
                module.register_buffer("_vsteer_acc_sums", sums, persistent=False)
                module.register_buffer("_vsteer_acc_index", effect_index, persistent=False)
                module._vsteer_acc_features = saes[layer].d_sae
                sas_state[layer] = sas_state[layer]._replace(effect_sums=sums)
        module._vsteer_reads_stream = (
            module._vsteer_capture is not None or module._vsteer_acc_sums is not None
            or module._vsteer_sas_activation is not None or module._vsteer_pool_sum is not None
        )
    return SteeringBuffers(tuple(wanted), bank, index, capture, activity, sas_state, effect_index, scale, gates)


def _attach_sae(module: nn.Module, sae: "SparseAutoencoder", num_slots: int, max_support: int, device: torch.device) -> SasBuffers:
    """Register one SAE's padded float32 weights and SAS buffers on a wrapped layer."""
    f = sae.d_sae
    with torch.no_grad():
        pad = lambda t: torch.cat([t.detach().float(), t.new_zeros((1, *t.shape[1:])).float()]).to(device)  # noqa: E731
        weights = {
            "w_enc_t": pad(sae.W_enc.t()), "b_enc": pad(sae.encoder_bias()), "w_dec": pad(sae.W_dec),
            "threshold": pad(sae.threshold) if sae.activation == "jumprelu" else None,
        }
    bank = torch.zeros(num_slots + 1, f + 1, dtype=torch.float32, device=device)
    topk = sae.activation == "topk"
    union = None if topk else torch.full((min(max_support, f),), f, dtype=torch.int64, device=device)
    for name, tensor in weights.items():
        if tensor is None:
            setattr(module, f"_vsteer_sas_{name}", None)
        else:
            module.register_buffer(f"_vsteer_sas_{name}", tensor.contiguous(), persistent=False)
    if topk:  # the full path: leave the padding feature out so it never takes a top-k place
        module._vsteer_sas_w_enc_t = module._vsteer_sas_w_enc_t[:f]
        module._vsteer_sas_b_enc = module._vsteer_sas_b_enc[:f]
        module._vsteer_sas_w_dec = module._vsteer_sas_w_dec[:f]
        module.register_buffer("_vsteer_sas_bank", bank[:, :f], persistent=False)
    else:
        module.register_buffer("_vsteer_sas_bank", bank, persistent=False)
    if union is None:
        module._vsteer_sas_union = None
    else:
        module.register_buffer("_vsteer_sas_union", union, persistent=False)
    module._vsteer_sas_activation = sae.activation
    module._vsteer_sas_k = sae.config.k
    module._vsteer_sas_fn = get_sas_backend(device)
    return SasBuffers(f, bank, union, None)
