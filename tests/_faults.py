"""Fault injection for tests: make one request's forward pass go non-finite, the way a numerical
fault in a model would, to check what the engine does then (vsteer.engine.failures).

A forward hook on decoder layer ``POISON_LAYER`` of an eager steered runner writes NaN into the
residual stream of every token whose steering slot holds a plan with an intervention of scale
``FAULT_SCALE``: the NaN then flows through the real model into the request's KV blocks, hidden
states and logits. Nothing else changes; requests without that scale are untouched.
"""

from __future__ import annotations

from typing import Any

import torch

FAULT_SCALE = 1.2345e-4
POISON_LAYER = 3


def install(runner: Any) -> None:
    """Install the fault on ``runner`` (a vsteer-steered vLLM model runner, eager)."""
    if getattr(runner, "_test_fault", None) is not None:
        return
    layer = runner.get_model().model.layers[POISON_LAYER]

    def poison(module, args, output):
        slots = [slot for key, slot in runner._vsteer_slots.resident.items() if key in runner._vsteer_key_source
                 and any(it.scale == FAULT_SCALE for it in runner._vsteer_key_source[key][0].interventions)]
        if not slots:
            return None
        hidden = output[0]
        index = runner._vsteer_buffers.index[: hidden.shape[0]]
        hidden[torch.isin(index, torch.tensor(slots, dtype=index.dtype))] = float("nan")
        return output

    runner._test_fault = layer.register_forward_hook(poison)


def remove(runner: Any) -> None:
    """Take the fault off ``runner``."""
    handle = getattr(runner, "_test_fault", None)
    if handle is not None:
        handle.remove()
        runner._test_fault = None
