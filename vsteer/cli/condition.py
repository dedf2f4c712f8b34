"""``vsteer condition search``: the layer, threshold and direction of a CAST condition that best
separate labelled prompts (a thin adapter over :mod:`vsteer.methods.condition`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vsteer._errors import SpecError

__all__ = ["condition"]


@click.group()
def condition() -> None:
    """Conditional steering (CAST) tools."""


@condition.command("search")
@click.option("--model", default="smollm2", show_default=True, help="Alias or local HF folder.")
@click.option("--vector", "vector_ref", required=True,
              help="The condition vector: a file (vsteer extract condition) or a stored name.")
@click.option("--positive", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompts where the condition should hold, one per line (as they will be sent).")
@click.option("--negative", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompts where it should not hold, one per line.")
@click.option("--layers", default=None, help="Comma-separated layers to try (default: every layer of the vector).")
@click.option("--pool", type=click.Choice(["mean", "last"]), default="mean", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Save F1/precision/recall per layer (.png).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write every layer's point as JSON.")
@click.option("--eager/--compile", default=True, show_default=True)
@click.option("--dtype", default=None, help="Engine dtype [default: auto; float32 on a CPU without native bfloat16].")
def search(model: str, vector_ref: str, positive: Path, negative: Path, layers: str | None, pool: str,
           plot: Path | None, json_path: Path | None, eager: bool, dtype: str | None) -> None:
    """Per layer, the threshold and direction (above/below) with the best F1; prints the table and
    the best point as a spec's "when"."""
    from vsteer.cli._common import echo_table, layers_option
    from vsteer.cli.extract import _extract_engine, _lines
    from vsteer.methods.condition import best_point, plot_condition_search, points_table, search_condition
    from vsteer.models import default_vector_store
    from vsteer.vectors import VectorStore, load_vector

    path = Path(vector_ref).expanduser()
    store = VectorStore(default_vector_store())
    if path.is_file():
        vector = load_vector(path)
    elif vector_ref in store.names():
        vector = store.get(store.resolve(vector_ref))
    else:
        raise SpecError(f"no vector file or stored name {vector_ref!r}", field="--vector")
    layer_ids = sorted(vector.layers) if layers is None else layers_option(layers, "--layers", allow_all=False)
    missing = sorted(set(layer_ids) - set(vector.layers))
    if not layer_ids or missing:
        raise SpecError(f"the vector has no direction at layers {missing or layer_ids} (it has {sorted(vector.layers)})",
                        field="--layers")
    pos, neg = _lines(positive), _lines(negative)
    if not pos or not neg:
        raise SpecError("both prompt files need at least one line", field="--positive" if not pos else "--negative")
    llm = _extract_engine(model, layer_ids, eager, dtype)
    points = search_condition(llm, vector, pos, neg, layer_ids, pool=pool)  # type: ignore[arg-type]
    best = best_point(points)
    echo_table([("layer", "compare", "threshold", "F1", "precision", "recall", "margin"),
                *((str(p.layer), p.compare, f"{p.threshold:.5f}", f"{p.f1:.3f}", f"{p.precision:.3f}",
                   f"{p.recall:.3f}", f"{p.margin:.5f}") for p in points)])
    click.echo(f"best: {json.dumps(best.when(vector_ref if not path.is_file() else str(path)))} (F1 {best.f1:.3f})")
    if plot is not None:
        plot_condition_search(points, plot, title=f"condition search ({len(pos)} + {len(neg)} prompts, pool {pool})")
        click.echo(f"wrote {plot}", err=True)
    if json_path is not None:
        json_path.write_text(json.dumps({"points": points_table(points), "best": best.layer}, indent=2))
        click.echo(f"wrote {json_path}", err=True)
