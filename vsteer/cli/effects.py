"""``vsteer effects``: fit the SAE-TS effect approximator and build targeted steering vectors.

A thin adapter over `vsteer.effects`. Errors are raised as vsteer errors and printed by
``vsteer.cli.main`` as ``ErrorName: message`` (exit 1). Results go to stdout, notes to stderr.
Nothing here imports vLLM: other subcommands of the group (``measure``) import it themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from vsteer.cli._common import ray_options

from vsteer._errors import SpecError

__all__ = ["effects"]


@click.group()
def effects() -> None:
    """Feature effects of steering vectors and SAE-targeted steering (SAE-TS)."""


@effects.command("fit")
@click.argument("effects_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Approximator file to write (.safetensors); the fit plot goes beside it as <stem>.fit.png.")
@click.option("--method", type=click.Choice(["adam", "lstsq"]), default="adam", show_default=True,
              help="adam: the paper's minibatch Adam on the MSE; lstsq: closed-form (ridge) least squares.")
@click.option("--test-fraction", default=0.1, show_default=True, help="Random share of vectors held out for the metrics.")
@click.option("--epochs", default=15, show_default=True, help="adam: passes over the data.")
@click.option("--lr", default=2e-4, show_default=True, help="adam: peak learning rate (cosine-annealed per epoch).")
@click.option("--batch-size", default=64, show_default=True, help="adam: vectors per step.")
@click.option("--ridge", default=0.0, show_default=True, help="lstsq: L2 penalty on M.")
@click.option("--seed", default=0, show_default=True, help="Seeds the split, the initialisation and the shuffling.")
@click.option("--device", default="cpu", show_default=True, help="adam: torch device to train on.")
@click.option("--top-k", default=10, show_default=True, help="Features compared by the top-k overlap metric.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write the predicted-vs-measured plot.")
def fit(effects_dir: Path, out: Path, method: str, test_fraction: float, epochs: int, lr: float, batch_size: int,
        ridge: float, seed: int, device: str, top_k: int, plot: bool) -> None:
    """Fit y = xM + b on the effects in EFFECTS_DIR; print held-out metrics as JSON."""
    from vsteer.effects import EffectApproximator, load_effects, train_test_split

    if not 0.0 <= test_fraction < 1.0:
        raise SpecError(f"must be in [0, 1), got {test_fraction}", field="--test-fraction")
    data = load_effects(effects_dir)
    train, test = train_test_split(data.n, test_fraction, seed)
    where = {"layer": data.layer, "sae": data.sae, "model": data.model}
    click.echo(f"fitting {method} on {len(train)} vectors (d_model {data.d_model}, d_sae {data.d_sae}), "
               f"{len(test)} held out", err=True)
    if method == "adam":
        approx = EffectApproximator.fit_adam(data.X[train], data.Y[train], lr=lr, epochs=epochs, batch_size=batch_size,
                                             seed=seed, device=device, **where)
    else:
        approx = EffectApproximator.fit_least_squares(data.X[train], data.Y[train], ridge=ridge, **where)
    metrics = {"train": approx.evaluate(data.X[train], data.Y[train], k=top_k)}
    shown = test if len(test) else train
    if len(test):
        metrics["test"] = approx.evaluate(data.X[test], data.Y[test], k=top_k)
    approx.meta["metrics"] = metrics
    approx.meta["effects"] = {"path": str(effects_dir), "n": data.n, "test_fraction": test_fraction, "split_seed": seed}
    approx.save(out)
    click.echo(json.dumps({"held_out" if len(test) else "train": metrics.get("test", metrics["train"]),
                           "train": metrics["train"]}, indent=2))
    note = f"wrote {out} (sha256 {approx.sha256[:12]})"
    if plot:
        try:
            from vsteer.effects.report import plot_approximator_fit

            x = data.X[shown]
            pred = approx.predict(x / x.norm(dim=1, keepdim=True))
            png = plot_approximator_fit(data.Y[shown], pred, out.with_suffix(".fit.png"),
                                        title="held out" if len(test) else "train")
            note += f" and {png}"
        except ImportError as exc:
            note += f"; no plot: {exc}"
    click.echo(note, err=True)


def _parse_features(values: tuple[str, ...]) -> int | dict[int, float]:
    weights: dict[int, float] = {}
    for text in values:
        fid, _, weight = text.partition(":")
        try:
            weights[int(fid)] = float(weight) if weight else 1.0
        except ValueError:
            raise SpecError(f"expected ID or ID:WEIGHT, got {text!r}", field="--feature") from None
    if len(weights) == 1 and next(iter(weights.values())) == 1.0:
        return next(iter(weights))
    return weights


def _sae_label(store: Any, ref: str, sae: Any) -> str:
    return ref if ref in store else (sae.config.name or Path(ref).stem)


@effects.command("target")
@click.option("--approximator", "approx_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File written by `vsteer effects fit`.")
@click.option("--sae", "sae_ref", default=None,
              help="The measuring SAE (a name in the SAE store or a path). Needed for --variant rotation; "
                   "otherwise checked against the approximator and recorded.")
@click.option("--feature", "features", required=True, multiple=True,
              help="Target feature id; repeat, or use ID:WEIGHT, to target a weighted mix.")
@click.option("--lam", default=1.0, show_default=True, help="Weight of the bias correction -lam * Mb/|Mb| (eq3, rotation).")
@click.option("--variant", type=click.Choice(["eq3", "pinv", "rotation"]), default="eq3", show_default=True,
              help="eq3: M_j/|M_j| - lam Mb/|Mb| (the paper); pinv: (t - b) pinv(M); rotation: rotate the decoder row.")
@click.option("--source-sae", "source_ref", default=None,
              help="rotation: take the feature's decoder row from this SAE (same layer) instead of --sae.")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help=".safetensors or .gguf")
@click.option("--name", default=None, help="Also store the vector under this name in the vector store (usable in specs).")
def target(approx_path: Path, sae_ref: str | None, features: tuple[str, ...], lam: float, variant: str,
           source_ref: str | None, output: Path, name: str | None) -> None:
    """Build a steering vector that targets SAE features; print its sha256."""
    from vsteer.effects import (
        EffectApproximator,
        pseudoinverse_vector,
        rotation_vector,
        targeted_vector,
    )
    from vsteer.vectors import save_vector

    approx = EffectApproximator.load(approx_path)
    feature = _parse_features(features)
    if variant == "rotation" and sae_ref is None:
        raise SpecError("the rotation variant needs the measuring SAE", field="--sae")
    if source_ref is not None and variant != "rotation":
        raise SpecError("only the rotation variant reads a second SAE", field="--source-sae")
    sae = store = None
    if sae_ref is not None:
        from vsteer.sae import SaeStore

        store = SaeStore()
        sae = store.resolve(sae_ref)
        if sae.d_sae != approx.d_sae or sae.d_in != approx.d_model:
            raise SpecError(f"SAE {sae_ref!r} (d_in {sae.d_in}, d_sae {sae.d_sae}) is not the approximator's "
                            f"(d_model {approx.d_model}, d_sae {approx.d_sae})", field="--sae")
    try:
        if variant == "eq3":
            vector = targeted_vector(approx, feature, lam=lam)
        elif variant == "pinv":
            vector = pseudoinverse_vector(approx, feature)
        else:
            source = store.resolve(source_ref) if source_ref is not None else None
            label = _sae_label(store, source_ref or sae_ref, source or sae)
            vector = rotation_vector(approx, sae, feature, lam=lam, source_sae=source, sae_name=label)
    except ValueError as exc:
        raise SpecError(str(exc), field="--feature") from exc
    if sae is not None:
        prov = vector.provenance
        prov.update(sae=_sae_label(store, sae_ref, sae), sae_sha256=sae.sha256())
        vector = vector.replace(provenance=prov)
    save_vector(vector, output)
    if name:
        from vsteer.models import default_vector_store
        from vsteer.vectors import VectorStore

        vector_store = VectorStore(default_vector_store())
        vector_store.set_name(name, vector_store.put(vector), overwrite=True)
    layer = vector.layer_indices[0]
    predicted = approx.predict(vector.layers[layer])
    fids = [feature] if isinstance(feature, int) else sorted(feature)
    # With --source-sae the ids name the other SAE's features: no prediction to show for them.
    effect = "" if source_ref else ", ".join(f"{f}: {float(predicted[f]):.4g}" for f in fids)
    click.echo(vector.sha256)
    click.echo(f"wrote {output} ({vector.method}, layer {layer}, sha256 {vector.sha256[:12]})"
               + (f", stored as {name!r}" if name else "")
               + (f"; predicted effect of the unit vector on {effect}" if effect else ""), err=True)


@effects.command("measure")
@click.option("--sae", "sae_ref", required=True, help="SAE (name in the SAE store or path); vectors are steered at its layer.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Job folder (resumable).")
@click.option("--model", default="smollm2", show_default=True)
@click.option("--vectors", type=click.Choice(["decoder", "random", "file"]), default="decoder", show_default=True,
              help="decoder: the SAE's decoder rows; random: --count random directions; file: --vectors-file.")
@click.option("--features", default=None, help="decoder: comma-separated rows or a range a:b (default all).")
@click.option("--count", type=int, default=None, help="random: how many directions.")
@click.option("--vectors-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help='file: safetensors with "directions" [N, d_model].')
@click.option("--scale", type=float, default=None, help="One scale for every vector.")
@click.option("--auto-scale", is_flag=True, help="Per vector, the scale where the LM loss rises by --loss-rise (SAE-TS).")
@click.option("--loss-rise", default=0.5, show_default=True, help="--auto-scale: loss rise over unsteered (paper).")
@click.option("--loss-target", type=float, default=None,
              help="--auto-scale: an absolute LM loss instead of --loss-rise (the paper's reference code).")
@click.option("--prompt", "prompts", multiple=True, help='Rollout prompt (repeatable; default "I think").')
@click.option("--rollouts", default=64, show_default=True, help="Rollouts per vector (paper: 896).")
@click.option("--baseline", type=click.Choice(["paired", "independent"]), default="paired", show_default=True,
              help="paired: unsteered rollouts on the vectors' own seeds (less noise, same effect); "
                   "independent: on other seeds (paper).")
@click.option("--baseline-rollouts", type=int, default=None,
              help="Unsteered rollouts (paired: must equal --rollouts, the default; independent: default 256; paper: 8,960).")
@click.option("--groups", default=1, show_default=True,
              help="Keep this many groups of rollouts apart (for `vsteer effects curve`); must divide --rollouts.")
@click.option("--seeds", type=click.Choice(["shared", "per-vector"]), default="shared", show_default=True,
              help="shared: rollout r of every vector has seed + r; per-vector: no two vectors share a seed, so "
                   "sampling noise averages out over vectors (needs --baseline independent).")
@click.option("--tokens", default=32, show_default=True, help="Tokens per rollout.")
@click.option("--top-k", default=50, show_default=True)
@click.option("--top-p", default=0.3, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--method", type=click.Choice(["fused", "two_pass"]), default="fused", show_default=True,
              help="fused: summed inside the engine during generation; two_pass: re-encode the finished texts.")
@click.option("--chunk-size", default=32, show_default=True, help="Vectors per unit of work (and of resume).")
@click.option("--eager/--compile", default=False, show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--max-num-seqs", default=256, show_default=True)
@ray_options
@click.option("--overwrite", is_flag=True, help="Discard an earlier run with other settings.")
def measure(sae_ref: str, out_dir: Path, model: str, vectors: str, features: str | None, count: int | None,
            vectors_file: str | None, scale: float | None, auto_scale: bool, loss_rise: float, loss_target: float | None,
            prompts: tuple[str, ...], rollouts: int, baseline: str, baseline_rollouts: int | None, groups: int, seeds: str, tokens: int, top_k: int, top_p: float, temperature: float, seed: int,
            method: str, chunk_size: int, eager: bool, dtype: str, max_num_seqs: int, use_ray: bool, workers: int,
            cpus_per_worker: float, gpus_per_worker: float, ray_address: str | None, overwrite: bool) -> None:
    """Measure the SAE feature effects of many steering vectors (SAE-TS eq. 2), checkpointed per chunk."""
    from vsteer.effects.data import load_effects
    from vsteer.effects.job import EffectsJob, run_effects_job
    from vsteer.effects.report import plot_effect_heatmap, top_effects_table

    if (scale is None) == (not auto_scale):
        raise SpecError("give either --scale or --auto-scale", field="--scale")
    feature_ids = _feature_list(features) if features else None
    job = EffectsJob(model=model, sae=sae_ref, vectors=vectors, features=feature_ids, count=count,
                     vectors_file=vectors_file, scale=scale, auto_scale=auto_scale, loss_rise=loss_rise,
                     loss_target=loss_target, prompts=list(prompts) or ["I think"], rollouts=rollouts,
                     baseline=baseline, baseline_rollouts=baseline_rollouts, groups=groups,
                     seeds=seeds.replace("-", "_"), tokens=tokens, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed, method=method,
                     chunk_size=chunk_size, engine={"enforce_eager": eager, "dtype": dtype, "max_num_seqs": max_num_seqs})
    try:
        job.rollout_config()
    except ValueError as exc:
        raise SpecError(str(exc), field=_rollout_field(str(exc))) from exc
    summary = run_effects_job(job, out_dir, workers=workers if use_ray else 0, cpus_per_worker=cpus_per_worker,
                              gpus_per_worker=gpus_per_worker, ray_address=ray_address, overwrite=overwrite)
    click.echo(json.dumps(summary))
    if summary["complete"]:
        data = load_effects(out_dir)
        click.echo(f"## Top effects of vector 0 (layer {data.layer}, SAE {data.sae})\n\n" + top_effects_table(data.Y[0], 10))
        try:
            path = plot_effect_heatmap(data.Y[:32], out_dir / "effects-heatmap.png")
            click.echo(f"heatmap: {path}", err=True)
        except ImportError as exc:
            click.echo(f"no heatmap: {exc}", err=True)


def _rollout_field(message: str) -> str:
    """The option a ``RolloutConfig`` error is about."""
    for needle, option in (("groups", "--groups"), ("baseline_rollouts must equal", "--baseline-rollouts"),
                           ("per-vector seeds", "--seeds"), ("prompt", "--prompt")):
        if needle in message:
            return option
    return "--rollouts"


@effects.command("curve")
@click.argument("train_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--heldout", "heldout_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A finished job with other vectors (ideally more rollouts) to score the fits on.")
@click.option("--vectors", "vector_counts", default=None, help="Comma-separated training-set sizes (default N/8, N/4, N/2, N).")
@click.option("--seed", default=0, show_default=True, help="Seeds the vector subsets and the validation split.")
@click.option("--out", "out_json", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the rows as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the plot (PNG).")
def curve(train_dir: Path, heldout_dir: Path, vector_counts: str | None, seed: int, out_json: Path | None,
          plot_path: Path | None) -> None:
    """Learning curve: held-out quality of least-squares fits on TRAIN_DIR (measured with --groups)
    against rollouts per vector and number of vectors."""
    from vsteer.effects.curve import learning_curve, load_grouped, plot_learning_curve, split_half
    from vsteer.effects.data import load_effects

    train = load_grouped(train_dir)
    held = load_effects(heldout_dir)
    if held.d_model != train.X.shape[1] or held.d_sae != train.steered.shape[2]:
        raise SpecError(f"held-out effects are [{held.d_model} -> {held.d_sae}], the training job's "
                        f"[{train.X.shape[1]} -> {train.steered.shape[2]}]", field="--heldout")
    counts = _feature_list(vector_counts, "--vectors") if vector_counts else None
    if counts is not None and any(n < 1 for n in counts):
        raise SpecError("training-set sizes must be >= 1", field="--vectors")
    rows = learning_curve(train, held.X, held.Y, vectors=counts, seed=seed)
    result: dict = {"rows": rows}
    try:
        result["heldout_split_half"] = split_half(load_grouped(heldout_dir))
    except ValueError:  # the held-out job has no groups (EffectsFileError is a ValueError)
        pass
    text = json.dumps(result, indent=2)
    if out_json:
        out_json.write_text(text)
    click.echo(text)
    if plot_path:
        click.echo(f"plot: {plot_learning_curve(rows, plot_path)}", err=True)


def _feature_list(text: str, field: str = "--features") -> list[int]:
    try:
        if ":" in text:
            lo, hi = (int(x) for x in text.split(":"))
            return list(range(lo, hi))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SpecError(f"expected comma-separated integers or a range a:b, got {text!r}", field=field) from exc
