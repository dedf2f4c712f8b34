"""Per-vector steering scales from the steered model's LM loss (SAE-TS, section 4).

The paper picks, per vector, the scale at which the LM loss on a text set rises by 0.5 over the
unsteered loss; the reference code sweeps scales and interpolates to an absolute target loss.
Both are here: ``rise=`` (paper) or ``target=`` (code). Every (vector, scale, text) is one
request carrying its own steering, all in one batched ``generate`` call with prompt logprobs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vsteer.vectors import SteeringVector

#: Neutral, varied English used when no loss texts are given.
DEFAULT_LOSS_TEXTS = (
    "The museum opens at nine in the morning and closes at five in the afternoon on weekdays.",
    "She poured the coffee, sat down by the window and watched the rain fall on the quiet street.",
    "To make the sauce, melt the butter in a pan, add the flour and stir until it turns golden.",
    "The committee will meet again next month to discuss the budget for the new school building.",
    "Most birds build their nests in spring, when food is easy to find and the days grow longer.",
    "He checked the map twice before turning left at the old bridge that crosses the river.",
    "The software update fixes several bugs and makes the application start a little faster.",
    "In the evening the children played football in the park until it was too dark to see the ball.",
)


def steered_losses(llm: Any, directions: torch.Tensor, scales: Sequence[float], layer: int, texts: Sequence[str]) -> torch.Tensor:
    """Mean next-token cross-entropy over ``texts`` for every (direction, scale): ``[N, S]``.

    A scale of 0 runs unsteered (it is the same model).
    """
    from vllm import SamplingParams

    if not texts:
        raise ValueError("scale selection needs at least one loss text")
    tok = llm.get_tokenizer()
    ids = [tok(t)["input_ids"] for t in texts]
    if any(len(x) < 2 for x in ids):
        raise ValueError("every loss text needs at least two tokens")
    shas = [llm.store.put(SteeringVector({layer: d.float()}, hidden_size=d.shape[0], method="effects-probe")) for d in directions]
    # a scale of 0 is the unsteered model, the same for every direction: run once
    cells = [(None, 0.0)] if any(s == 0 for s in scales) else []
    cells += [(sha, float(s)) for sha in shas for s in scales if s != 0]
    prompts, specs = [], []
    for sha, s in cells:
        spec = None if sha is None else {"interventions": [{"op": "add", "vector": sha, "layers": [layer], "scale": s}]}
        prompts += ids
        specs += [spec] * len(ids)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate(prompts, params, steering=specs)
    losses = []
    for out, x in zip(outs, prompts):
        # prompt_logprobs[0] is None (no context); entry t holds the logprob of token t
        lps = [out.prompt_logprobs[t][x[t]].logprob for t in range(1, len(x))]
        losses.append(-sum(lps) / len(lps))
    per_cell = torch.tensor(losses, dtype=torch.float64).view(len(cells), len(ids)).mean(-1)
    at = {cell: i for i, cell in enumerate(cells)}
    return torch.stack([torch.stack([per_cell[at[(None, 0.0)] if s == 0 else at[(sha, float(s))]] for s in scales])
                        for sha in shas])


def pick_scales(losses: torch.Tensor, scales: Sequence[float], threshold: torch.Tensor | float) -> torch.Tensor:
    """Per row, the scale where the loss first reaches ``threshold``, linearly interpolated between
    the candidate scales; rows that never reach it get the largest candidate."""
    grid = torch.tensor(list(scales), dtype=torch.float64)
    thr = torch.as_tensor(threshold, dtype=torch.float64).expand(losses.shape[0])
    out = torch.full((losses.shape[0],), float(grid[-1]), dtype=torch.float64)
    for i, row in enumerate(losses):
        above = torch.nonzero(row >= thr[i]).flatten()
        if len(above) == 0:
            continue
        j = int(above[0])
        if j == 0:
            out[i] = grid[0]
            continue
        lo, hi = row[j - 1], row[j]
        frac = (thr[i] - lo) / (hi - lo) if hi > lo else 1.0
        out[i] = grid[j - 1] + frac * (grid[j] - grid[j - 1])
    return out.float()


def select_scales(
    llm: Any,
    directions: torch.Tensor,
    layer: int,
    texts: Sequence[str] = DEFAULT_LOSS_TEXTS,
    *,
    candidates: Sequence[float] = tuple(range(0, 201, 20)),
    rise: float | None = 0.5,
    target: float | None = None,
) -> torch.Tensor:
    """One scale per direction: where the loss rises by ``rise`` over unsteered (paper), or reaches
    the absolute ``target`` (reference code). ``candidates`` must start at 0 and increase."""
    cands = [float(c) for c in candidates]
    if not cands or cands[0] != 0 or any(b <= a for a, b in zip(cands, cands[1:])):
        raise ValueError(f"candidates must start at 0 and increase, got {cands}")
    if (rise is None) == (target is None):
        raise ValueError("give exactly one of rise and target")
    losses = steered_losses(llm, directions, cands, layer, texts)
    threshold = losses[:, 0] + rise if target is None else target
    return pick_scales(losses, cands, threshold)
