"""SAS vectors (Bayat et al. 2025, "Steering Large Language Model Activations in Sparse Spaces").

From contrastive pairs (a prompt with a positive and a negative completion): the SAE codes of the
completion tokens, read inside vLLM at the SAE's layer, give one row per example (the mean code
over its completion tokens; a feature is "active" in an example if it fires on any of its
completion tokens). Then, per side: keep the features active in at least a fraction ``tau`` of the
rows, average each kept feature over the rows where it is active; drop features kept on both
sides; ``s = v+ - v-`` (METHODS.md, SAS). The paper's exact row convention (per example or per
token) is not public; ``rows="token"`` gives the per-token variant. Absolute position 0 is never
read (its residual is the attention-sink outlier of every sequence), so with an empty prompt the
completion's first token is left out.

Apply it with ``{"op": "sas", "vector": ..., "sae": <name>, "scale": lambda}``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from vsteer.vectors import SteeringVector

if TYPE_CHECKING:
    from vsteer.sae import SparseAutoencoder

Rows = Literal["example", "token"]


@dataclass(frozen=True)
class ContrastPair:
    """A prompt with a completion showing the behaviour and one showing its opposite."""

    prompt: str
    positive: str
    negative: str


def sas_from_codes(positive: torch.Tensor, negative: torch.Tensor, tau: float) -> torch.Tensor:
    """Algorithm 1 on code matrices ``[rows, d_sae]`` (one row per example or token): float32 ``s``."""
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1]:
        raise ValueError(f"codes must be [rows, d_sae] with equal d_sae, got {tuple(positive.shape)} and {tuple(negative.shape)}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if positive.shape[0] == 0 or negative.shape[0] == 0:
        raise ValueError("SAS needs at least one positive and one negative row")

    def side(codes: torch.Tensor) -> torch.Tensor:
        codes = codes.double()
        active = codes != 0
        freq = active.double().mean(dim=0)
        mean_active = codes.sum(dim=0) / active.sum(dim=0).clamp(min=1)
        return torch.where(freq >= tau, mean_active, torch.zeros_like(mean_active))

    v_pos, v_neg = side(positive), side(negative)
    shared = (v_pos != 0) & (v_neg != 0)
    v_pos[shared] = 0.0
    v_neg[shared] = 0.0
    return (v_pos - v_neg).float()


def completion_codes(llm: Any, sae: "SparseAutoencoder", prompts: Sequence[str], completions: Sequence[str], *, rows: Rows = "example") -> torch.Tensor:
    """SAE codes of the completion tokens, read inside the engine at the SAE's layer."""
    if sae.layer is None:
        raise ValueError("the SAE does not record the layer it reads")
    tok = llm.get_tokenizer()
    inputs, starts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        if not completion.strip():
            raise ValueError("SAS got an empty completion")
        head = tok(prompt)["input_ids"] if prompt else []
        tail = tok(completion, add_special_tokens=not head)["input_ids"]
        if len(head) + len(tail) < 2:
            raise ValueError(f"completion {completion!r} of an empty prompt needs at least two tokens")
        inputs.append(head + tail)
        starts.append(len(head))
    acts = llm.capture(inputs, [sae.layer])
    out = []
    with torch.no_grad():
        for cap, start in zip(acts, starts):
            codes = sae.encode(cap[sae.layer][max(start, 1):].float())  # never position 0 (attention sink)
            out.append(codes.mean(dim=0, keepdim=True) if rows == "example" else codes)
    return torch.cat(out)


def sas_vector(
    llm: Any,
    sae: "SparseAutoencoder",
    pairs: Sequence[ContrastPair],
    *,
    tau: float = 0.7,
    rows: Rows = "example",
    sae_name: str | None = None,
    model: str | None = None,
) -> SteeringVector:
    """The SAS vector of ``pairs`` in ``sae``'s feature space, stored at the SAE's layer.

    Example:
        >>> pairs = [ContrastPair("I think", " weddings are lovely", " taxes are due")]
        >>> s = sas_vector(llm, llm.saes["smollm2-l15-4k"], pairs, tau=0.5, sae_name="smollm2-l15-4k")
    """
    if not pairs:
        raise ValueError("sas_vector needs at least one contrastive pair")
    if rows not in ("example", "token"):
        raise ValueError(f"rows must be 'example' or 'token', got {rows!r}")
    prompts = [p.prompt for p in pairs]
    pos = completion_codes(llm, sae, prompts, [p.positive for p in pairs], rows=rows)
    neg = completion_codes(llm, sae, prompts, [p.negative for p in pairs], rows=rows)
    s = sas_from_codes(pos, neg, tau)
    if not bool((s != 0).any()):
        raise ValueError(
            f"no SAE feature passes tau={tau} on exactly one side; lower tau or give more pairs"
        )
    data = json.dumps([[p.prompt, p.positive, p.negative] for p in pairs])
    return SteeringVector(
        {sae.layer: s},
        hidden_size=sae.d_sae,
        model=model,
        method="sas",
        provenance={
            "sae": sae_name or sae.config.name,
            "sae_sha256": sae.sha256(),
            "sae_layer": sae.layer,
            "tau": tau,
            "rows": rows,
            "num_pairs": len(pairs),
            "pairs_sha256": hashlib.sha256(data.encode()).hexdigest(),
            "support": int((s != 0).sum()),
            "apply": "op sas with this SAE; scale = lambda",
        },
    )
