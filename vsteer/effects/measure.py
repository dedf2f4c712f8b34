"""Feature effects of steering vectors (SAE-TS paper eq. 2; DESIGN.md section 6).

effect(v) = mean over every token of the steered rollouts of f(h_L) minus the same mean over the
unsteered rollouts, ``f`` the SAE at layer L and ``h_L`` the residual at the output of layer L
before the steering there (what re-running the text through the unsteered model reads).

Two ways to get the means, on the same rollouts:

- ``fused`` (default): every request carries its own vector and an effect row; the engine sums
  ``f(h)`` per request during generation, at the SAE's layer, before the add. Nothing but the
  sums leaves the engine and there is no second pass. The engine only runs a token through the
  model once the next one is asked for, so a rollout of T tokens is generated with T + 1 and
  summed over its first T.
- ``two_pass`` (the reference): generate T tokens, then read the finished texts' residuals with
  ``capture`` and encode them on the host. It also serves SAEs at another layer than the steering.

Rollout r of every vector uses prompt ``r % len(prompts)`` and, by default (``seeds="shared"``),
sampling seed ``seed + r``: every vector's rollout r shares its seed with every other vector's.
That noise is then common to all vectors, so it does not average out over vectors: a fit with a
bias term (the SAE-TS approximator) takes it into its bias. ``seeds="per_vector"`` gives vector i
(its index in the job) the seeds ``seed + i * rollouts + r`` instead, so no two vectors share a
seed; it needs the independent baseline. Two baselines, both unbiased for the same effect
E[steered] - E[unsteered]:

- ``paired`` (default): the unsteered rollouts 0..R-1 with the same prompts and seeds as every
  vector's rollouts (common random numbers), so a steered rollout and its baseline rollout differ
  by the steering only and most of the sampling noise cancels in the difference. R baseline
  rollouts serve every vector.
- ``independent`` (the paper's): ``baseline_rollouts`` unsteered rollouts on seeds that no
  vector rollout uses (``seed + INDEPENDENT_SEED_OFFSET + r``).

``groups`` splits each vector's R rollouts into G equal consecutive groups whose sums are kept
apart (learning curves: the first g groups are the measurement with g R / G rollouts, paired with
the baseline's first g groups).
Positions counted: the whole rollout text (prompt and generated tokens) from ``start`` on; the
default ``start = 1`` leaves out position 0, whose residual is the attention-sink outlier of
every sequence.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from vsteer.vectors import SteeringVector

if TYPE_CHECKING:
    from vsteer.sae import SparseAutoencoder

Method = Literal["fused", "two_pass"]
Baseline = Literal["paired", "independent"]
Seeds = Literal["shared", "per_vector"]
#: Independent baseline rollouts use seeds from ``seed + INDEPENDENT_SEED_OFFSET`` on.
INDEPENDENT_SEED_OFFSET = 2**30


@dataclass(frozen=True)
class RolloutConfig:
    """How rollouts are sampled (defaults follow the SAE-TS reference, but with fewer rollouts)."""

    prompts: tuple[str, ...] = ("I think",)
    rollouts: int = 64  # per vector (paper: 896 = 14 prompts x 64)
    baseline_rollouts: int | None = None  # unsteered: paired -> rollouts; independent -> 256 (paper: 8,960)
    tokens: int = 32
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.3
    seed: int = 0
    start: int = 1  # first absolute position counted
    baseline: Baseline = "paired"
    groups: int = 1  # rollout groups kept apart (learning curves)
    seeds: Seeds = "shared"  # per_vector: no two vectors share a seed (needs baseline="independent")

    def __post_init__(self) -> None:
        if not self.prompts or any(not p for p in self.prompts):
            raise ValueError("rollouts need at least one non-empty prompt")
        if self.baseline not in ("paired", "independent"):
            raise ValueError(f"baseline must be 'paired' or 'independent', got {self.baseline!r}")
        if self.seeds not in ("shared", "per_vector"):
            raise ValueError(f"seeds must be 'shared' or 'per_vector', got {self.seeds!r}")
        if self.seeds == "per_vector" and self.baseline == "paired":
            raise ValueError("per-vector seeds need baseline='independent': a paired baseline shares its seeds "
                             "with every vector's rollouts")
        if self.baseline_rollouts is None:
            object.__setattr__(self, "baseline_rollouts", self.rollouts if self.baseline == "paired" else 256)
        if self.rollouts < 1 or self.baseline_rollouts < 1 or self.tokens < 1:
            raise ValueError("rollouts, baseline_rollouts and tokens must be >= 1")
        if self.baseline == "paired" and self.baseline_rollouts != self.rollouts:
            raise ValueError(f"a paired baseline has one unsteered rollout per vector rollout: baseline_rollouts "
                             f"must equal rollouts ({self.rollouts}), got {self.baseline_rollouts}")
        if self.groups < 1 or self.rollouts % self.groups or self.baseline_rollouts % self.groups:
            raise ValueError(f"groups ({self.groups}) must divide rollouts ({self.rollouts}) and baseline_rollouts "
                             f"({self.baseline_rollouts})")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")

    def seed_of(self, r: int, *, baseline: bool = False, vector: int = 0) -> int:
        """Sampling seed of rollout ``r`` of the baseline, or of vector number ``vector`` (which
        matters with per-vector seeds only)."""
        if baseline:
            return self.seed + (INDEPENDENT_SEED_OFFSET if self.baseline == "independent" else 0) + r
        if self.seeds == "shared":
            return self.seed + r
        offset = vector * self.rollouts + r
        if not 0 <= offset < INDEPENDENT_SEED_OFFSET:
            raise ValueError(f"per-vector seeds of vector {vector} would reach the baseline's seeds")
        return self.seed + offset


@dataclass
class EffectResult:
    """Mean SAE codes per vector, the baseline mean and the effects (their difference)."""

    steered: torch.Tensor  # [N, d_sae] float64
    baseline: torch.Tensor  # [d_sae] float64
    tokens: torch.Tensor  # [N] positions counted per vector
    baseline_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def effects(self) -> torch.Tensor:
        return (self.steered - self.baseline).float()


def _params(config: RolloutConfig, seed: int, max_tokens: int, extra: dict | None = None):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        seed=seed, ignore_eos=True, extra_args=extra,
    )


def probe_specs(llm: Any, directions: torch.Tensor, scales: torch.Tensor, layer: int) -> list[dict | None]:
    specs: list[dict | None] = []
    for d, s in zip(directions, scales):
        sha = llm.store.put(SteeringVector({layer: d.float()}, hidden_size=d.shape[0], method="effects-probe"))
        specs.append({"interventions": [{"op": "add", "vector": sha, "layers": [layer], "scale": float(s)}]})
    return specs


def rollout_sums(
    llm: Any,
    sae: "SparseAutoencoder",
    specs: Sequence[dict | None],
    config: RolloutConfig,
    rollouts: int,
    *,
    method: Method = "fused",
    effect_layer: int | None = None,
    baseline: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``f(h)`` and number of positions, per spec, over ``rollouts`` rollouts each:
    ``[N, d_sae]`` and ``[N]``. ``baseline``: these are baseline rollouts (their seeds)."""
    sums, counts = rollout_group_sums(llm, sae, specs, config, rollouts, groups=1, method=method,
                                      effect_layer=effect_layer, baseline=baseline)
    return sums[:, 0], counts[:, 0]


def rollout_group_sums(
    llm: Any,
    sae: "SparseAutoencoder",
    specs: Sequence[dict | None],
    config: RolloutConfig,
    rollouts: int,
    *,
    groups: int = 1,
    method: Method = "fused",
    effect_layer: int | None = None,
    baseline: bool = False,
    first_vector: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`rollout_sums`, per group of ``rollouts / groups`` consecutive rollouts:
    ``[N, G, d_sae]`` and ``[N, G]`` (``groups=rollouts``: one row per rollout). ``first_vector``:
    the number of ``specs[0]`` among all the vectors measured (for per-vector seeds).

    All ``len(specs) x rollouts`` requests go into one ``generate`` call (the engine batches them;
    every request carries its own steering)."""
    if groups < 1 or rollouts % groups:
        raise ValueError(f"groups ({groups}) must divide rollouts ({rollouts})")
    per_group = rollouts // groups
    rs = [r for _ in specs for r in range(rollouts)]
    prompts = [config.prompts[r % len(config.prompts)] for r in rs]
    steering = [spec for spec in specs for _ in range(rollouts)]
    seeds = [config.seed_of(r, baseline=baseline, vector=first_vector + i) for i in range(len(specs))
             for r in range(rollouts)]
    n = len(specs)
    sums = torch.zeros(n, groups, sae.d_sae, dtype=torch.float64)
    counts = torch.zeros(n, groups, dtype=torch.int64)
    if method == "fused":
        keys = [uuid.uuid4().hex for _ in prompts]
        effects = {"start": config.start, "tokens": config.tokens}
        params = [_params(config, seed, config.tokens + 1, {"vsteer_effects": {**effects, "key": k}})
                  for seed, k in zip(seeds, keys)]
        llm.generate(prompts, params, steering=steering)
        got = llm.take_effects(keys)
        layer = sae.layer if effect_layer is None else effect_layer
        for j, key in enumerate(keys):
            item = got.get(key)
            if item is None or item["partial"]:
                raise RuntimeError(f"the engine returned no complete effect sums for rollout {j}")
            sums[j // rollouts, rs[j] // per_group] += item["sums"][layer].double()
            counts[j // rollouts, rs[j] // per_group] += item["count"]
        return sums, counts
    if method != "two_pass":
        raise ValueError(f"method must be 'fused' or 'two_pass', got {method!r}")
    params = [_params(config, seed, config.tokens) for seed in seeds]
    outs = llm.generate(prompts, params, steering=steering)
    texts = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]
    acts = llm.capture(texts, [sae.layer])
    with torch.no_grad():
        for j, cap in enumerate(acts):
            codes = sae.encode(cap[sae.layer][config.start:].float())
            sums[j // rollouts, rs[j] // per_group] += codes.double().sum(0)
            counts[j // rollouts, rs[j] // per_group] += codes.shape[0]
    return sums, counts


def measure_effects(
    llm: Any,
    sae: "SparseAutoencoder",
    directions: torch.Tensor,
    scales: torch.Tensor | float,
    config: RolloutConfig = RolloutConfig(),
    *,
    layer: int | None = None,
    method: Method = "fused",
    baseline: tuple[torch.Tensor, int] | None = None,
) -> EffectResult:
    """Effects of adding ``scales[i] * directions[i]`` at ``layer`` (default: the SAE's layer).

    Args:
        llm: a ``vsteer.LLM`` with ``sae`` among its ``effect_saes`` (fused) or any (two_pass).
        directions: ``[N, d_model]``.
        scales: one scale or ``[N]``.
        baseline: a precomputed unsteered ``(mean [d_sae], tokens)`` to reuse across calls (it must
            come from the same ``config``: a paired baseline pairs by seed).
    """
    layer = sae.layer if layer is None else layer
    if method == "fused" and layer != sae.layer:
        raise ValueError(f"fused effects need the SAE at the steered layer ({sae.layer}), not {layer}; use two_pass")
    directions = torch.as_tensor(directions, dtype=torch.float32)
    if directions.ndim != 2:
        raise ValueError(f"directions must be [N, d_model], got {tuple(directions.shape)}")
    scales_t = torch.full((len(directions),), float(scales)) if isinstance(scales, (int, float)) else torch.as_tensor(scales, dtype=torch.float32)
    if scales_t.shape != (len(directions),):
        raise ValueError(f"scales must be one number or [N={len(directions)}], got {tuple(scales_t.shape)}")
    sums, counts = rollout_sums(llm, sae, probe_specs(llm, directions, scales_t, layer), config, config.rollouts, method=method)
    if baseline is None:
        base_sum, base_count = rollout_sums(llm, sae, [None], config, config.baseline_rollouts, method=method,
                                            baseline=True)
        baseline = (base_sum[0] / base_count[0], int(base_count[0]))
    return EffectResult(
        steered=sums / counts.clamp(min=1)[:, None],
        baseline=baseline[0].double(),
        tokens=counts,
        baseline_tokens=baseline[1],
        meta={"layer": layer, "method": method, "sae_layer": sae.layer, "config": config.__dict__ | {"prompts": list(config.prompts)}},
    )
