"""CAA steering vectors from activations captured inside vLLM.

Two methods:

- ``caa_vector`` (Panickssery et al. 2024, "Steering Llama 2 via Contrastive Activation
  Addition"): A/B multiple-choice items formatted with the model's chat template, the assistant
  turn opened with "(" and the answer letter; the residual at the answer-letter token (the last
  prompt token); v = mean over items of (matching-behaviour letter - other letter). Apply it with
  ``positions="from_last_prompt_token"`` (the reference masks ``position_ids >= from_pos``).
- ``mean_difference``: what most users call CAA, the mean activation over a set of positive texts
  minus the mean over negative texts, each text pooled to one vector by the mean over its tokens
  (``pooling="mean"``) or its last token (``pooling="last"``).

Activations are read at the OUTPUT of each decoder layer (HF ``hidden_states[L+1]``), where vsteer
also steers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

import torch

from vsteer.vectors import SteeringVector

Pooling = Literal["mean", "last"]


class _Captures(Protocol):
    def capture(self, prompts: Sequence[Any], layers: Sequence[int]) -> list[dict[int, torch.Tensor]]: ...

    def get_tokenizer(self) -> Any: ...


@dataclass(frozen=True)
class ABItem:
    """One A/B item: the question with its options, and which letter shows the behaviour."""

    question: str
    matching: str  # "A" or "B": the answer matching the behaviour
    other: str  # the other letter


def ab_prompt(tokenizer: Any, question: str, letter: str) -> list[int]:
    """Chat-formatted item ending with the assistant's "(<letter>"; returns token ids."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text + f"({letter}", add_special_tokens=False)["input_ids"]


def caa_vector(
    llm: _Captures, items: Sequence[ABItem], layers: Sequence[int], *, model: str | None = None
) -> SteeringVector:
    """v_L = mean_i (h_L(item_i, matching letter) - h_L(item_i, other letter)) at the letter token.

    Example:
        >>> item = ABItem("Do you like people?\n(A) Yes\n(B) No", matching="A", other="B")
        >>> v = caa_vector(llm, [item], layers=[10])
    """
    if not items:
        raise ValueError("caa_vector needs at least one A/B item")
    tok = llm.get_tokenizer()
    prompts = []
    for i, item in enumerate(items):
        if {item.matching, item.other} != {"A", "B"}:
            raise ValueError(f"item {i}: letters must be 'A' and 'B', got {item.matching!r}/{item.other!r}")
        prompts += [ab_prompt(tok, item.question, item.matching), ab_prompt(tok, item.question, item.other)]
    layers = [int(x) for x in layers]
    acts = llm.capture(prompts, layers)
    out = {}
    for layer in layers:
        diffs = [acts[2 * i][layer][-1].double() - acts[2 * i + 1][layer][-1].double() for i in range(len(items))]
        out[layer] = torch.stack(diffs).mean(dim=0).float()
    return SteeringVector.from_tensors(
        out,
        model=model,
        method="caa",
        provenance={
            "variant": "A/B items, chat template, answer-letter token (last prompt token)",
            "num_items": len(items),
            "items_sha256": _texts_sha([f"{it.question}|{it.matching}" for it in items]),
            "apply_positions": "from_last_prompt_token",
        },
    )


def _pool(acts: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    return acts.mean(dim=0) if pooling == "mean" else acts[-1]


def _texts_sha(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def mean_difference(
    llm: _Captures,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Sequence[int],
    *,
    pooling: Pooling = "mean",
    model: str | None = None,
) -> SteeringVector:
    """v_L = mean_i pool(h_L(pos_i)) - mean_j pool(h_L(neg_j)) for each layer L.

    Args:
        llm: a ``vsteer.LLM`` (anything with ``capture``).
        positive: texts showing the behaviour.
        negative: texts showing its opposite.
        layers: decoder layers whose OUTPUT is read (and later steered).
        pooling: "mean" over each text's tokens, or its "last" token.
        model: model name recorded in the vector.

    Example:
        >>> v = mean_difference(llm, ["I love you"], ["I hate you"], layers=[10])
    """
    if not positive or not negative:
        raise ValueError("mean_difference needs at least one positive and one negative text")
    if any(not t.strip() for t in [*positive, *negative]):
        raise ValueError("mean_difference got an empty text")
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    layers = [int(x) for x in layers]
    acts = llm.capture(list(positive) + list(negative), layers)
    pos, neg = acts[: len(positive)], acts[len(positive) :]
    out = {}
    for layer in layers:
        p = torch.stack([_pool(a[layer].double(), pooling) for a in pos]).mean(dim=0)
        n = torch.stack([_pool(a[layer].double(), pooling) for a in neg]).mean(dim=0)
        out[layer] = (p - n).float()
    return SteeringVector.from_tensors(
        out,
        model=model,
        method="caa-mean-difference",
        provenance={
            "pooling": pooling,
            "num_positive": len(positive),
            "num_negative": len(negative),
            "positive_sha256": _texts_sha(positive),
            "negative_sha256": _texts_sha(negative),
            "read_at": "output of decoder layer (HF hidden_states[L+1])",
        },
    )
