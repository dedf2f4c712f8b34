"""Effect-measurement jobs: many vectors, in chunks, checkpointed, resumable, optionally on Ray.

A job folder holds ``job.json`` (the settings; a rerun with other settings is refused unless told to
start over), ``baseline.safetensors`` (the unsteered mean codes), ``chunks/chunk-<i>.safetensors``
(per chunk of vectors: directions, scales, mean codes, positions counted; written atomically, so a
chunk is either done or not) and, once every chunk is done, ``effects.safetensors`` in the format
of ``vsteer.effects.data`` (directions ``X`` and effects ``Y = steered - baseline``).
With ``groups`` > 1, chunks and baseline also keep ``group_mean`` ``[n, G, d_sae]`` and
``group_tokens`` ``[n, G]`` (each group of rollouts apart), from which ``vsteer.effects.curve`` draws
learning curves. ``timing.json`` keeps the measuring time and rollouts summed over every run of the job, and
``probe-vectors/`` the vectors the engine steered with (a job-private vector store).

Stopping at any point (Ctrl-C, a crash, a lost node) loses at most the chunks in flight; the rerun
skips finished chunks, so nothing is counted twice. On Ray, a chunk whose actor dies is retried on a
fresh actor (``vsteer.jobs.pool.EnginePool``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from vsteer._errors import EngineError
from vsteer.effects.measure import RolloutConfig, rollout_group_sums
from vsteer.jobs.pool import maybe_crash

JOB_VERSION = 2  # 2: paired baselines and rollout groups
#: Vector store of a job's probe vectors, inside its folder.
PROBE_STORE = "probe-vectors"


class EffectsJob(BaseModel):
    """What to measure. Saved as ``job.json``; equal settings mean a rerun resumes."""

    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2"
    sae: str = Field(description="SAE (name in the SAE store or path); the steering layer is its layer.")
    vectors: Literal["decoder", "random", "file"] = "decoder"
    features: list[int] | None = Field(default=None, description="decoder: which rows (default all).")
    count: int | None = Field(default=None, description="random: how many unit directions.")
    vectors_file: str | None = Field(default=None, description="file: safetensors with 'directions' [N, d].")
    vector_seed: int = 0
    scale: float | None = Field(default=None, description="One scale for every vector (else auto_scale).")
    auto_scale: bool = Field(default=False, description="Pick each vector's scale from the steered LM loss.")
    scale_candidates: list[float] = Field(default_factory=lambda: [float(s) for s in range(0, 201, 20)])
    loss_rise: float | None = Field(default=0.5, description="auto_scale: the loss rise over unsteered (paper).")
    loss_target: float | None = Field(default=None, description="auto_scale: an absolute loss instead (reference code).")
    loss_texts: list[str] | None = None
    prompts: list[str] = Field(default_factory=lambda: ["I think"])
    rollouts: int = 64
    baseline: Literal["paired", "independent"] = Field(
        default="paired", description="paired: unsteered rollouts on the vectors' seeds; independent: other seeds (paper).")
    baseline_rollouts: int | None = Field(default=None, description="Default: rollouts (paired), 256 (independent).")
    groups: int = Field(default=1, description="Rollout groups kept apart in the chunks (learning curves).")
    seeds: Literal["shared", "per_vector"] = Field(
        default="shared", description="shared: rollout r of every vector has seed + r; per_vector: vector i has "
        "seed + i * rollouts + r (needs the independent baseline).")
    tokens: int = 32
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.3
    seed: int = 0
    start: int = 1
    method: Literal["fused", "two_pass"] = "fused"
    chunk_size: int = 32
    engine: dict[str, Any] = Field(default_factory=dict, description="Extra vsteer.LLM keyword arguments.")

    def rollout_config(self) -> RolloutConfig:
        return RolloutConfig(prompts=tuple(self.prompts), rollouts=self.rollouts, baseline_rollouts=self.baseline_rollouts,
                             tokens=self.tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                             seed=self.seed, start=self.start, baseline=self.baseline, groups=self.groups,
                             seeds=self.seeds)

    def manifest(self) -> dict:
        data = self.model_dump(mode="json")
        data.pop("engine")  # how the engine runs does not change what is measured
        if data["seeds"] == "shared":
            data.pop("seeds")  # jobs from before the setting resume
        return {"version": JOB_VERSION, **data}


def job_directions(job: EffectsJob, sae: Any) -> torch.Tensor:
    """The unit directions to measure, ``[N, d_model]``, deterministic for the job."""
    if job.vectors == "decoder":
        rows = list(range(sae.d_sae)) if job.features is None else job.features
        bad = [f for f in rows if not 0 <= f < sae.d_sae]
        if bad:
            raise ValueError(f"feature {bad[0]} is out of range: the SAE has features 0..{sae.d_sae - 1}")
        d = sae.W_dec.detach()[rows].float()
    elif job.vectors == "random":
        if not job.count or job.count < 1:
            raise ValueError("vectors='random' needs count >= 1")
        d = torch.randn(job.count, sae.d_in, generator=torch.Generator().manual_seed(job.vector_seed))
    else:
        if not job.vectors_file:
            raise ValueError("vectors='file' needs vectors_file")
        d = load_file(job.vectors_file)["directions"].float()
        if d.ndim != 2 or d.shape[1] != sae.d_in:
            raise ValueError(f"{job.vectors_file}: directions must be [N, {sae.d_in}], got {tuple(d.shape)}")
    norms = d.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a direction to measure is all zeros")
    return d / norms


def _engine_sae(llm: Any) -> Any:
    return next(iter(llm.saes.values()))


def baseline_task(llm: Any, job_json: str) -> dict[str, torch.Tensor]:
    job = EffectsJob.model_validate_json(job_json)
    sae = _engine_sae(llm)
    config = job.rollout_config()
    sums, counts = rollout_group_sums(llm, sae, [None], config, config.baseline_rollouts, groups=job.groups,
                                      method=job.method, baseline=True)
    return _means(sums, counts, job.groups)


def _means(sums: torch.Tensor, counts: torch.Tensor, groups: int) -> dict[str, torch.Tensor]:
    """Per-row means over all rollouts (``mean``, ``tokens``) and, with groups, per group too."""
    total = counts.sum(1)
    out = {"mean": sums.sum(1) / total.clamp(min=1)[:, None], "tokens": total}
    if groups > 1:
        out |= {"group_mean": sums / counts.clamp(min=1)[..., None], "group_tokens": counts}
    return out


def chunk_task(llm: Any, job_json: str, index: int, directions: torch.Tensor) -> dict[str, torch.Tensor]:
    """One chunk on one engine: scales (fixed or chosen from the LM loss), then the rollouts."""
    maybe_crash(index)
    job = EffectsJob.model_validate_json(job_json)
    sae = _engine_sae(llm)
    if job.auto_scale:
        from vsteer.effects.scales import DEFAULT_LOSS_TEXTS, select_scales

        rise = None if job.loss_target is not None else job.loss_rise
        scales = select_scales(llm, directions, sae.layer, job.loss_texts or DEFAULT_LOSS_TEXTS,
                               candidates=job.scale_candidates, rise=rise, target=job.loss_target)
    else:
        scales = torch.full((len(directions),), float(job.scale))
    from vsteer.effects.measure import probe_specs

    sums, counts = rollout_group_sums(llm, sae, probe_specs(llm, directions, scales, sae.layer), job.rollout_config(),
                                      job.rollouts, groups=job.groups, method=job.method,
                                      first_vector=index * job.chunk_size)
    return {"directions": directions, "scales": scales, **_means(sums, counts, job.groups)}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def engine_kwargs(job: EffectsJob, out_dir: str | os.PathLike | None = None) -> dict:
    """``vsteer.LLM`` keyword arguments for the engine that runs ``job`` (its SAE as an effect SAE).

    With ``out_dir``, the probe vectors go to ``<out_dir>/probe-vectors`` instead of the user's
    vector store (thousands of anonymous vectors there would bury the user's own)."""
    store = {"store": str(Path(out_dir).resolve() / PROBE_STORE)} if out_dir is not None else {}
    return {"model": job.model, "saes": [job.sae], "effect_saes": [_sae_name(job.sae)], **store, **job.engine}


def _sae_name(ref: str) -> str:
    from vsteer.sae import SaeStore

    store = SaeStore()
    return ref if ref in store else (store.resolve(ref).config.name or Path(ref).stem)


def run_effects_job(
    job: EffectsJob,
    out_dir: str | os.PathLike,
    *,
    workers: int = 0,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    ray_address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_chunks: int | None = None,
    llm: Any = None,
) -> dict:
    """Run or resume ``job`` into ``out_dir``; ``workers`` > 0 fans chunks out over a Ray pool.

    ``max_chunks`` stops after that many new chunks (as an interruption would). ``llm``: an
    engine to use in-process instead of building one (it must load the job's SAE as an effect
    SAE). Returns a summary; the effects are in ``out_dir/effects.safetensors`` once complete.
    """
    from tqdm import tqdm

    from vsteer.sae import SaeStore

    out = Path(out_dir)
    if job.scale is None and not job.auto_scale:
        raise ValueError("give a scale, or auto_scale=True")
    job.rollout_config()  # settings that do not fit together fail before anything is written
    chunks_dir = out / "chunks"
    manifest_path = out / "job.json"
    manifest = job.manifest()
    if overwrite and out.exists():
        for p in [*chunks_dir.glob("*.safetensors"), out / "baseline.safetensors", out / "effects.safetensors",
                  manifest_path, out / "timing.json"]:
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous != manifest:
            changed = sorted(k for k in set(manifest) | set(previous) if previous.get(k) != manifest.get(k))
            raise EngineError(f"{out} holds a run with other settings ({', '.join(changed)}); rerun the same "
                              "command to resume, or pass overwrite (--overwrite) to start again")
    else:
        manifest_path.write_text(json.dumps(manifest, indent=2))

    sae = SaeStore().resolve(job.sae)
    directions = job_directions(job, sae)
    bounds = [(i, s, min(s + job.chunk_size, len(directions))) for i, s in enumerate(range(0, len(directions), job.chunk_size))]
    done = {i for i, _, _ in bounds if (chunks_dir / f"chunk-{i:06d}.safetensors").exists()}
    todo = [(i, (job.model_dump_json(), i, directions[s:e].clone())) for i, s, e in bounds if i not in done]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    need_baseline = not (out / "baseline.safetensors").exists()
    job_json = job.model_dump_json()

    items = ([("baseline", ("baseline", job_json))] if need_baseline else []) + [(i, ("chunk", *a)) for i, a in todo]
    pool = None
    if not items:  # nothing left to measure: no engine, no pool

        def run(items: list) -> Iterator[tuple[Any, dict]]:
            return iter(())
    elif workers > 0:
        from vsteer.jobs.pool import EnginePool

        pool = EnginePool(workers, engine_kwargs(job, out), cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                          address=ray_address)

        def run(items: list) -> Iterator[tuple[Any, dict]]:
            yield from pool.map("vsteer.effects.job._dispatch", items)
    else:
        if llm is None:
            from vsteer.engine.llm import LLM

            llm = LLM(**engine_kwargs(job, out))

        def run(items: list) -> Iterator[tuple[Any, dict]]:
            for key, args in items:
                yield key, _dispatch(llm, *args)

    per_item = {"baseline": job.rollout_config().baseline_rollouts, **{i: len(a[2]) * job.rollouts for i, a in todo}}
    bar = tqdm(total=len(bounds), initial=len(done), unit="chunk", disable=not progress, dynamic_ncols=True)
    started, rollouts = time.monotonic(), 0
    try:
        for key, result in run(items):
            path = out / "baseline.safetensors" if key == "baseline" else chunks_dir / f"chunk-{key:06d}.safetensors"
            _save_atomic(result, path)
            rollouts += per_item[key]
            if key != "baseline":
                bar.update(1)
            bar.set_postfix_str(f"{rollouts / max(time.monotonic() - started, 1e-9):.1f} rollouts/s")
    finally:
        bar.close()
        retries = pool.retries if pool is not None else 0
        if pool is not None:
            pool.shutdown()
    finished = sorted(i for i, _, _ in bounds if (chunks_dir / f"chunk-{i:06d}.safetensors").exists())
    seconds = time.monotonic() - started
    summary = {"chunks": len(bounds), "done": len(finished), "resumed": len(done), "retries": retries,
               "rollouts": rollouts, "seconds": round(seconds, 2),
               "rollouts_per_s": round(rollouts / max(seconds, 1e-9), 2), "complete": False,
               "total": _add_timing(out / "timing.json", seconds, rollouts)}
    if len(finished) == len(bounds):
        _assemble(job, out, bounds, sae)
        summary["complete"] = True
    return summary


def _add_timing(path: Path, seconds: float, rollouts: int) -> dict:
    """Add this run's time and rollouts to the job's running totals (``timing.json``) and return them."""
    total = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0, "rollouts": 0, "runs": 0}
    total = {"seconds": round(total["seconds"] + seconds, 2), "rollouts": total["rollouts"] + rollouts,
             "runs": total["runs"] + 1}
    path.write_text(json.dumps(total))
    return total


def _dispatch(llm: Any, kind: str, *args: Any) -> dict:
    return baseline_task(llm, *args) if kind == "baseline" else chunk_task(llm, *args)


def _assemble(job: EffectsJob, out: Path, bounds: list, sae: Any) -> None:
    from vsteer.effects.data import save_effects
    from vsteer.models import model_info, resolve_model

    base = load_file(out / "baseline.safetensors")
    parts = [load_file(out / "chunks" / f"chunk-{i:06d}.safetensors") for i, _, _ in bounds]
    X = torch.cat([p["directions"] for p in parts])
    Y = torch.cat([p["mean"] for p in parts]) - base["mean"]
    meta = {"model": model_info(resolve_model(job.model)).name, "sae": job.sae, "layer": sae.layer, "method": job.method,
            "tokens": torch.cat([p["tokens"] for p in parts]).tolist(), "baseline_tokens": int(base["tokens"][0]),
            "job": job.manifest()}
    save_effects(out, X.float(), Y.float(), meta, scales=torch.cat([p["scales"] for p in parts]).float())
