"""Sampling noise of measured feature effects: the paired baseline against the independent one.

Both estimate the same effect, E_steered[f(h)] - E_unsteered[f(h)] over every counted position
(SAE-TS eq. 2; ``vsteer.effects.measure``), from R rollouts per vector:

- paired: ``sum_r (S_r - B_r) / sum_r c_r``, where ``S_r`` and ``B_r`` are the code sums of steered
  and unsteered rollout r, which share prompt and sampling seed, and ``c_r`` its positions. Its
  variance is ``sum_r Var(S_r - B_r) / (sum_r c_r)^2``: what the two rollouts share cancels.
- independent (the paper's): ``sum_r S_r / sum_r c_r - sum_b B'_b / sum_b c'_b`` with baseline
  rollouts on seeds no vector rollout uses; variance ``Var(S) R / (sum c)^2 + Var(B') B / (sum c')^2``.

Every vector's rollouts share the seeds too, so part of the noise is common to all vectors. A fit
with a bias term (the effect approximator, ``y = xM + b``) absorbs that part, and what is left is the
same for both baselines: per rollout, subtracting the mean over vectors removes the baseline
entirely. ``centred_var`` is that remainder.

The variances are estimated from the spread of the per-rollout sums. With one prompt every rollout
has the same distribution and the estimates are unbiased; with several prompts they also count the
spread between prompts, so they err high (for both estimators alike).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from vsteer.effects.measure import Method, RolloutConfig, probe_specs, rollout_group_sums

if TYPE_CHECKING:
    from vsteer.sae import SparseAutoencoder


@dataclass
class BaselineComparison:
    """Per vector: both estimates of its effect and each estimate's variance, per feature."""

    paired: torch.Tensor  # [N, d_sae] float64
    independent: torch.Tensor  # [N, d_sae]
    paired_var: torch.Tensor  # [N, d_sae] variance of the paired estimate
    independent_var: torch.Tensor  # [N, d_sae]
    centred_var: torch.Tensor  # [N, d_sae] variance left once the mean over vectors is subtracted (either baseline)
    rollouts: int
    baseline_rollouts: int  # of the independent baseline

    def total_variance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected squared error of each vector's whole effect estimate (summed over features):
        ``(paired [N], independent [N])``."""
        return self.paired_var.sum(1), self.independent_var.sum(1)

    def centred_total_variance(self) -> torch.Tensor:
        """As :meth:`total_variance` for the centred estimates (what a fit with a bias sees): ``[N]``."""
        return self.centred_var.sum(1)

    def rollouts_saved(self) -> torch.Tensor:
        """Per vector, independent over paired variance: how many times the rollouts the independent
        estimator needs for the paired one's precision (with this baseline size)."""
        paired, independent = self.total_variance()
        return independent / paired.clamp(min=1e-300)


def _estimate(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean code per position over rows' rollouts, and its variance: sums ``[..., R, d]``, counts ``[..., R]``."""
    total = counts.sum(-1).double()
    r = sums.shape[-2]
    var = sums.var(-2, correction=1) * r / total[..., None] ** 2 if r > 1 else torch.full_like(sums[..., 0, :], float("nan"))
    return sums.sum(-2) / total[..., None], var


def compare_baselines(
    llm: Any,
    sae: "SparseAutoencoder",
    directions: torch.Tensor,
    scales: torch.Tensor | float,
    config: RolloutConfig,
    *,
    independent_rollouts: int | None = None,
    method: Method = "fused",
) -> BaselineComparison:
    """Measure ``directions`` (unit rows, each added at its scale at the SAE's layer) with
    ``config.rollouts`` rollouts each, and estimate their effects against a paired baseline (the
    same seeds) and against an independent one (``independent_rollouts`` rollouts, default as
    many; other seeds). The steered rollouts are the same for both."""
    directions = torch.as_tensor(directions, dtype=torch.float32)
    n, rollouts = len(directions), config.rollouts
    scales_t = torch.full((n,), float(scales)) if isinstance(scales, (int, float)) else torch.as_tensor(scales, dtype=torch.float32)
    specs = probe_specs(llm, directions, scales_t, sae.layer)
    paired_cfg = replace(config, baseline="paired", baseline_rollouts=rollouts, groups=1)
    b_ind = independent_rollouts or rollouts
    indep_cfg = replace(config, baseline="independent", baseline_rollouts=b_ind, groups=1)
    s, c = rollout_group_sums(llm, sae, specs, paired_cfg, rollouts, groups=rollouts, method=method)
    b, cb = rollout_group_sums(llm, sae, [None], paired_cfg, rollouts, groups=rollouts, method=method, baseline=True)
    bi, ci = rollout_group_sums(llm, sae, [None], indep_cfg, b_ind, groups=b_ind, method=method, baseline=True)
    if not torch.equal(c, cb.expand_as(c)):
        raise RuntimeError("paired rollouts counted different positions; they must share prompts and lengths")
    paired, paired_var = _estimate(s - b, c)
    steered, steered_var = _estimate(s, c)
    base, base_var = _estimate(bi[0], ci[0])
    _, centred_var = _estimate(s - s.mean(0, keepdim=True) if n > 1 else torch.full_like(s, float("nan")), c)
    return BaselineComparison(paired=paired, independent=steered - base, paired_var=paired_var,
                              independent_var=steered_var + base_var, centred_var=centred_var, rollouts=rollouts,
                              baseline_rollouts=b_ind)
