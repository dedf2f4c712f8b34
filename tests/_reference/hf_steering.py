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


def condition_sim(pooled: torch.Tensor, c: torch.Tensor) -> float:
    """CAST's similarity in float64: cos(h, tanh(P h)), P = c c^T / (c^T c)."""
    h, c = pooled.double(), c.double()
    proj = torch.tanh((torch.outer(c, c) / (c @ c)) @ h)
    return float(torch.nn.functional.cosine_similarity(h, proj, dim=0))


@contextmanager
def hooked(model, interventions: Sequence[dict], prompt_len: int, record: dict | None = None) -> Iterator[None]:
    """interventions: dicts with op, direction (tensor [d] or {layer: tensor}), layers, scale,
    positions, normalize, schedule (vsteer.schedules tuple), when. Applied in order at the OUTPUT of each
    layer (HF hidden_states[L+1]). A schedule multiplies the layer's composed change (after sas) by
    its value at t = position - prompt_len (t < 0 counts as 0).

    ``when`` (CAST): {"combine": "any"|"all", "conditions": [{"vector": [d], "layer", "threshold",
    "compare": "above"|"below", "pool": "mean"|"last"}]}. Each condition pools the prompt's residual at
    the output of its layer (before that layer's steering), in float64; the gate multiplies the
    layer's change on generated positions, and on the last prompt position at layers after the
    gate's last condition layer. ``record`` (optional) receives {"sims": {(gate, k): sim}, "gates":
    {gate: bool}} from the last forward pass."""
    by_layer: dict[int, list[dict]] = {}
    gates = list(dict.fromkeys(id(it["when"]) for it in interventions if it.get("when") is not None))
    whens = {id(it["when"]): it["when"] for it in interventions if it.get("when") is not None}
    cond_layers: dict[int, list[tuple[int, int, dict]]] = {}
    for g, key in enumerate(gates):
        for k, cond in enumerate(whens[key]["conditions"]):
            cond_layers.setdefault(cond["layer"], []).append((g, k, cond))
    for item in interventions:
        for layer in item["layers"]:
            by_layer.setdefault(layer, []).append(item)
    for layer in cond_layers:
        by_layer.setdefault(layer, [])
    met: dict[tuple[int, int], bool] = {}
    rec = record if record is not None else {}
    rec.update(sims={}, gates={})
    handles = []

    def gate_value(when: dict) -> float:
        g = gates.index(id(when))
        hits = [met[(g, k)] for k in range(len(when["conditions"]))]
        value = any(hits) if when.get("combine", "any") == "any" else all(hits)
        rec["gates"][g] = value
        return float(value)

    def make_hook(layer: int, items: list[dict]):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            h = hidden.double()
            seq_len = h.shape[1]
            for g, k, cond in cond_layers.get(layer, ()):
                prompt = h[0, :prompt_len]
                pooled = prompt.mean(dim=0) if cond.get("pool", "mean") == "mean" else prompt[-1]
                sim = condition_sim(pooled, cond["vector"])
                rec["sims"][(g, k)] = sim
                met[(g, k)] = sim > cond["threshold"] if cond.get("compare", "above") == "above" else sim < cond["threshold"]
            if not items:
                return output
            before = base = h
            any_norm = False
            sched = next((it["schedule"] for it in items if it.get("schedule") is not None), None)
            when = next((it["when"] for it in items if it.get("when") is not None), None)
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
            if sched is not None or when is not None:
                t = torch.arange(seq_len, dtype=torch.float64) - prompt_len
                mult = torch.from_numpy(schedules.values(sched, t.numpy()))[None, :, None]
                if when is not None:
                    pos = torch.arange(seq_len)
                    known = pos >= prompt_len
                    if layer > max(c["layer"] for c in when["conditions"]):
                        known = known | (pos == prompt_len - 1)
                    # before its condition layers in a pass, the gate comes from the earlier passes
                    # (the prompt, so the gate, is the same in every pass); unread on the prompt pass
                    value = gate_value(when) if bool(known.any()) else 0.0
                    mult = mult * (known.double() * value)[None, :, None]
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
           constraint=None, record: dict | None = None) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, steering with forward hooks. ``constraint`` (optional,
    for structured outputs): ``mask(logits)`` sets disallowed tokens to -inf in place before the
    choice, ``accept(token)`` returns True when the output is complete."""
    ids = list(prompt_ids)
    out, logprobs = [], []
    with hooked(model, interventions, len(prompt_ids), record):
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
