"""``vsteer sae``: train an SAE for a local model without downloads, and list, show, import SAEs.

A thin adapter over :mod:`vsteer.sae` (:func:`~vsteer.sae.train.train_model_sae`,
:class:`~vsteer.sae.store.SaeStore`, :func:`~vsteer.sae.formats.load_sae`). Errors are vsteer
errors, printed by ``vsteer.cli.main`` as ``ErrorName: message``. Results
go to stdout, notes to stderr. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from vsteer.cli._common import echo_listing, echo_table, store_option

__all__ = ["sae"]

_store_option = store_option(
    "VSTEER_SAE_STORE", "SAE store folder [default: <cache>/saes, the cache being $VSTEER_CACHE or ~/.cache/vsteer].")


def _open_store(store_dir: Path | None) -> Any:
    from vsteer.sae.store import SaeStore

    return SaeStore(Path(os.path.expanduser(store_dir)) if store_dir is not None else None)


def eval_table(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows ``vsteer sae train`` prints (and the benchmark reuses)."""
    ev, lm, tr = report["eval"], report["lm"], report["train"]
    return [
        ("L0 (mean active features / token)", f"{ev['l0']:.1f}"),
        ("variance explained (1 - FVU)", f"{ev['variance_explained']:.3f}"),
        ("FVU", f"{ev['fvu']:.3f}"),
        ("dead features (never active on eval)", f"{ev['dead_features']} ({100 * ev['dead_fraction']:.1f}%)"),
        ("LM loss clean", f"{lm['clean_loss']:.3f}"),
        ("LM loss SAE spliced", f"{lm['spliced_loss']:.3f}"),
        ("LM loss zero-ablated", f"{lm['zero_ablation_loss']:.3f}"),
        ("loss recovered", f"{lm['loss_recovered']:.3f}"),
        ("eval tokens (activations / LM)", f"{ev['tokens']} / {lm['tokens']}"),
        ("train steps x batch", f"{tr['steps']} x {tr['tokens'] // max(tr['steps'], 1)}"),
        ("collect / train / eval seconds", f"{report['collect_seconds']} / {report['train_seconds']} / {report['eval_seconds']}"),
    ]


@click.group()
def sae() -> None:
    """Sparse autoencoders: train one for a local model, list, show and import them."""


@sae.command("train")
@click.option("--model", default="smollm2", show_default=True, help="Alias or local HF folder.")
@click.option("--layer", default=15, show_default=True, help="Decoder layer whose output the SAE reads.")
@click.option("--width", default=4096, show_default=True, help="Number of SAE features (d_sae).")
@click.option("--tokens", default=300_000, show_default=True, help="Training activations to collect.")
@click.option("--name", required=True, help="Store the SAE under this name.")
@click.option("--activation", type=click.Choice(["topk", "relu"]), default="topk", show_default=True,
              help="TopK (k active features, no L1) or ReLU with an L1 penalty weighted by decoder norms.")
@click.option("--k", type=int, default=None, help="Active features per token (TopK only; default 32).")
@click.option("--l1", "l1_coefficient", default=2.0, show_default=True, help="ReLU sparsity coefficient (inputs normalised to mean squared norm d_in).")
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--batch-size", default=4096, show_default=True, help="Tokens per optimizer step.")
@click.option("--steps", type=int, default=None, help="Optimizer steps [default: --epochs passes over the tokens].")
@click.option("--epochs", default=8.0, show_default=True)
@click.option("--gen-tokens", default=192, show_default=True, help="Tokens sampled per prompt for the training text.")
@click.option("--eval-tokens", default=20_000, show_default=True, help="Held-out activations for L0 / FVU / dead features.")
@click.option("--eval-texts", default=64, show_default=True, help="Held-out sequences for the spliced LM loss.")
@click.option("--seed", default=0, show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Activations, checkpoints and report.json [default: <cache>/sae-train/<name>].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Also save the SAE folder here.")
@_store_option
@click.option("--resume/--no-resume", default=True, show_default=True, help="Keep activations and checkpoints of an earlier run.")
@click.option("--overwrite", is_flag=True, help="Replace a stored SAE of the same name.")
@click.option("--dtype", default="auto", show_default=True, help="Engine dtype for generation and capture (auto: the model's).")
@click.option("--eager/--compile", default=True, show_default=True)
def train(model: str, layer: int, width: int, tokens: int, name: str, activation: str, k: int | None, l1_coefficient: float,
          lr: float, batch_size: int, steps: int | None, epochs: float, gen_tokens: int, eval_tokens: int, eval_texts: int,
          seed: int, work_dir: Path | None, out: Path | None, store_dir: Path | None, resume: bool, overwrite: bool,
          dtype: str, eager: bool) -> None:
    """Train an SAE at LAYER from the model's own generations (captured inside vLLM), evaluate it
    on held-out generations and store it as NAME. Rerun the same command to resume."""
    from vsteer._errors import SaeFileError, SpecError
    from vsteer.engine.llm import LLM
    from vsteer.models import default_cache_dir
    from vsteer.sae.train import train_model_sae

    if activation == "topk":
        k = 32 if k is None else k
    elif k is not None:
        raise SpecError("--k is only for --activation topk", field="--k")
    store = _open_store(store_dir)
    if name in store and not overwrite:
        raise SaeFileError(f"an SAE named {name!r} is already stored; pass --overwrite to replace it", key=name)
    store.path(name)  # validates the name before any work
    work = work_dir or default_cache_dir() / "sae-train" / name
    llm = LLM(model, enforce_eager=eager, dtype=dtype, capture_layers=[layer], max_model_len=512, max_num_seqs=64)
    if not 0 <= layer < llm.model_shape.num_layers:
        raise SpecError(f"layer {layer} is out of range 0..{llm.model_shape.num_layers - 1}", field="--layer")
    trained, report = train_model_sae(
        llm, layer, width=width, tokens=tokens, work_dir=work, activation=activation, k=k, steps=steps, epochs=epochs,
        batch_size=batch_size, lr=lr, l1_coefficient=l1_coefficient, seed=seed, gen_tokens=gen_tokens,
        eval_tokens=eval_tokens, eval_texts=eval_texts, name=name, resume=resume,
    )
    path = store.add(name, trained, overwrite=overwrite)
    if out is not None:
        from vsteer.sae.formats import save_sae

        save_sae(trained, out)
    echo_table([("METRIC", "VALUE"), *eval_table(report)])
    click.echo(f"stored {name!r} in {path} (sha256 {trained.sha256()[:12]}); report in {Path(work) / 'report.json'}", err=True)


@sae.command("list")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_saes(store_dir: Path | None, as_json: bool) -> None:
    """List the stored SAEs."""
    from vsteer._errors import SaeFileError

    store = _open_store(store_dir)
    rows: list[dict[str, Any]] = []
    for name in store.names():
        try:
            c = store.get(name).config
            rows.append({"name": name, "model": c.model, "layer": c.layer, "d_in": c.d_in, "d_sae": c.d_sae,
                         "activation": c.activation + (f"(k={c.k})" if c.k else "")})
        except SaeFileError as exc:
            rows.append({"name": name, "error": str(exc)})
    echo_listing(
        rows, as_json=as_json, empty=f"no SAEs in {store.root}",
        header=("NAME", "MODEL", "LAYER", "D_IN", "D_SAE", "ACTIVATION"),
        cells=lambda r: (r["name"], r["model"] or "-", "-" if r["layer"] is None else str(r["layer"]), str(r["d_in"]),
                         str(r["d_sae"]), r["activation"]),
        unreadable=lambda r: (r["name"],),
    )


@sae.command("info")
@click.argument("name")
@_store_option
def info(name: str, store_dir: Path | None) -> None:
    """Print the stored SAE NAME's config, sha256 and folder as JSON."""
    store = _open_store(store_dir)
    s = store.get(name)
    click.echo(json.dumps({"name": name, "path": str(store.path(name)), "sha256": s.sha256(), **s.config.to_json()}, indent=2))


@sae.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="Store the SAE under this name.")
@click.option("--layer", type=int, default=None, help="The layer it reads, where the files do not say.")
@click.option("--model", default=None, help="The model it was trained on, where the files do not say.")
@click.option("--overwrite", is_flag=True, help="Replace a stored SAE of the same name.")
@_store_option
def import_(path: Path, name: str, layer: int | None, model: str | None, overwrite: bool, store_dir: Path | None) -> None:
    """Store the SAE at PATH (vsteer folder, SAELens folder or Gemma Scope params.npz) as NAME."""
    from vsteer.sae.formats import load_sae

    loaded = load_sae(path, layer=layer, model=model)
    store = _open_store(store_dir)
    folder = store.add(name, loaded, overwrite=overwrite)
    c = loaded.config
    click.echo(f"stored {name!r} in {folder} ({c.activation}, d_in {c.d_in}, d_sae {c.d_sae}, layer {c.layer})", err=True)
