"""Reference: steering an HF transformers model with forward hooks (what repeng and
steering-vectors do), greedy decoding by full recomputation so positions are explicit."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from vsteer import schedules


def _mask(positions, seq_len: int, prompt_len: int) -> torch.Tensor:
    pos = torch.arange(seq_len)
    if positions == "all":
        return torch.ones(seq_len, dtype=torch.bool)
    if positions == "prompt":
        return pos < prompt_len
    if positions == "generated":
        return pos >= prompt_len
    if positions == "from_last_prompt_token":
        return pos >= prompt_len - 1
    lo, hi = positions
    return (pos >= lo) & (pos < hi)


@contextmanager
def hooked(model, interventions: Sequence[dict], prompt_len: int) -> Iterator[None]:
    """interventions: dicts with op, direction (tensor [d] or {layer: tensor}), layers, scale,
    positions, normalize, schedule (vsteer.schedules tuple). Applied in order at the OUTPUT of each
    layer (HF hidden_states[L+1]). A schedule multiplies the layer's composed change (after sas) by
    its value at t = position - prompt_len (t < 0 counts as 0)."""
    by_layer: dict[int, list[dict]] = {}
    for item in interventions:
        for layer in item["layers"]:
            by_layer.setdefault(layer, []).append(item)
    handles = []

    def make_hook(layer: int, items: list[dict]):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            h = hidden.double()
            seq_len = h.shape[1]
            before = base = h
            any_norm = False
            sched = next((it["schedule"] for it in items if it.get("schedule") is not None), None)
            for it in items:
                m = _mask(it.get("positions", "all"), seq_len, prompt_len)[None, :, None]
                if it["op"] == "sas":  # SAS in float64, error term kept
                    sae = it["sae"]
                    w_enc, w_dec = sae.W_enc.double(), sae.W_dec.double()
                    z = sae.activate(h @ w_enc + sae.encoder_bias().double())
                    shifted = sae.activate(z + it.get("scale", 1.0) * it["s"].double())
                    h = torch.where(m, h + (shifted - z) @ w_dec, h)
                    base = h  # a schedule scales what comes after sas
                    continue
                if it["op"] == "affine":  # h + scale * ((h A^T) B + b), in float64
                    A, B, b = (t.double() for t in it["affine"][layer])
                    h = torch.where(m, h + it.get("scale", 1.0) * ((h @ A.T) @ B + b), h)
                    continue
                v = it["direction"][layer] if isinstance(it["direction"], dict) else it["direction"]
                v = v.double()
                if it["op"] == "mul":
                    h = torch.where(m, h * v, h)
                elif it["op"] == "add":
                    h = torch.where(m, h + it.get("scale", 1.0) * v, h)
                    if it.get("normalize"):
                        any_norm = True
                        norm_mask = m
                else:
                    u = v / v.norm()
                    h = torch.where(m, h - (h @ u)[..., None] * u, h)
            if any_norm:
                rescaled = h * (before.norm(dim=-1, keepdim=True) / h.norm(dim=-1, keepdim=True))
                h = torch.where(norm_mask, rescaled, h)
            if sched is not None:
                t = torch.arange(seq_len, dtype=torch.float64) - prompt_len
                mult = torch.from_numpy(schedules.values(sched, t.numpy()))[None, :, None]
                h = base + mult * (h - base)
            new = h.to(hidden.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    for layer, items in by_layer.items():
        handles.append(model.model.layers[layer].register_forward_hook(make_hook(layer, items)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def greedy(model, prompt_ids: list[int], max_tokens: int, interventions: Sequence[dict] = (),
           constraint=None) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, steering with forward hooks. ``constraint`` (optional,
    for structured outputs): ``mask(logits)`` sets disallowed tokens to -inf in place before the
    choice, ``accept(token)`` returns True when the output is complete."""
    ids = list(prompt_ids)
    out, logprobs = [], []
    with hooked(model, interventions, len(prompt_ids)):
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            if constraint is not None:
                constraint.mask(logits)
            lp = torch.log_softmax(logits, dim=-1)
            tok = int(lp.argmax())
            out.append(tok)
            logprobs.append(float(lp[tok]))
            ids.append(tok)
            if constraint is not None and constraint.accept(tok):
                break
    return out, logprobs


@torch.no_grad()
def hidden_states(model, prompt_ids: list[int]) -> tuple[torch.Tensor, ...]:
    return model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states


@contextmanager
def actadd_prehook(model, block: int, h_a: torch.Tensor) -> Iterator[None]:
    """ActAdd's reference hook: add h_A to the first n positions of the INPUT of ``block`` on the
    prompt pass (here: every full-recomputation pass, whose first positions are the prompt)."""

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        n = min(h_a.shape[0], hidden.shape[1])
        new = hidden.clone()
        new[:, :n] = (hidden[:, :n].double() + h_a[:n].double()).to(hidden.dtype)
        if args:
            return (new,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    handle = model.model.layers[block].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
