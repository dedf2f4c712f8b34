"""Wrapping vLLM decoder layers so they apply per-token slot steering.

Each steerable layer's ``__class__`` is swapped, once at load and before torch.compile traces the
model, for a subclass whose ``forward`` calls the original and then applies the slot bank row of
every token to the residual stream (forward hooks would be dropped by torch.compile). All wrapped
layers share one per-token slot index; each owns a view of one stacked bank. Nothing in forward
branches on data: the graph vLLM traces (and CUDA graphs replay) reads the buffers' contents.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vsteer._errors import UnsupportedArchitectureError
from vsteer.kernels import BankLayout, get_steer_backend

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


class _SteeredPair:
    """Mixin for ``(hidden, residual)`` layers: steer the returned residual, out of place."""

    def forward(self, *args, **kwargs):
        hidden, residual = super().forward(*args, **kwargs)
        n = hidden.shape[0]
        if self._vsteer_capture is not None:
            self._vsteer_capture[:n].copy_(hidden + residual)
        residual = self._vsteer_apply(hidden, residual, self._vsteer_bank, self._vsteer_index[:n], rank=self._vsteer_rank)
        return hidden, residual


class _SteeredSingle:
    """Mixin for blocks that return the residual stream itself."""

    def forward(self, *args, **kwargs):
        hidden = super().forward(*args, **kwargs)
        n = hidden.shape[0]
        if self._vsteer_capture is not None:
            self._vsteer_capture[:n].copy_(hidden)
        return self._vsteer_apply(hidden, None, self._vsteer_bank, self._vsteer_index[:n], rank=self._vsteer_rank)


class _SkipUnusedLayer:
    """Eager-only: skip the steering op on steps that neither steer nor capture this layer.

    Put ahead of the steered mixin; ``_vsteer_mixin`` (set on the built class) names it, so the
    skip path calls the original layer's forward directly.
    """

    def forward(self, *args, **kwargs):
        act = self._vsteer_activity
        if self._vsteer_layer in act.steer or (act.capture and self._vsteer_capture is not None):
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


class SteeringBuffers(NamedTuple):
    """Device buffers shared by the wrapped layers (allocated once)."""

    layers: tuple[int, ...]  # wrapped decoder layer ids, in bank order
    bank: torch.Tensor  # [len(layers), num_slots + 1, W] float32
    index: torch.Tensor  # [max_tokens] int32 slot per token; slot 0 = identity
    capture: dict[int, torch.Tensor]  # layer -> [max_tokens, hidden] in the model dtype
    activity: StepActivity  # read by eager layers only


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
) -> SteeringBuffers:
    """Swap each steerable decoder layer's class for its steered subclass; return the buffers.

    Mutates ``model`` in place. ``num_slots`` excludes the identity slot 0. ``eager`` (no
    torch.compile, no CUDA graphs) lets layers skip the op on steps that do not use them.
    """
    present = find_decoder_layers(model)
    wanted = sorted(present) if steerable_layers is None else sorted(set(steerable_layers) & set(present))
    captured = set(wanted) if capture_layers is None else set(capture_layers) & set(wanted)
    bank = layout.identity_bank(len(wanted) * (num_slots + 1), device=device).view(len(wanted), num_slots + 1, layout.width)
    index = torch.zeros(max_tokens, dtype=torch.int32, device=device)
    capture = {layer: torch.zeros(max_tokens, layout.hidden_size, dtype=dtype, device=device) for layer in sorted(captured)}
    apply = get_steer_backend(device)
    activity = StepActivity()
    for row, layer in enumerate(wanted):
        module = present[layer]
        module.__class__ = _steered_class(type(module), eager)
        module._vsteer_layer = layer
        module._vsteer_activity = activity
        module.register_buffer("_vsteer_bank", bank[row], persistent=False)
        module.register_buffer("_vsteer_index", index, persistent=False)
        if layer in capture:
            module.register_buffer("_vsteer_capture", capture[layer], persistent=False)
        else:
            module._vsteer_capture = None
        module._vsteer_rank = layout.rank
        module._vsteer_apply = apply
    return SteeringBuffers(tuple(wanted), bank, index, capture, activity)
