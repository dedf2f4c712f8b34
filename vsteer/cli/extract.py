"""``vsteer extract``: compute steering vectors from activations captured inside vLLM (a thin
adapter over :mod:`vsteer.methods`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from vsteer._errors import SpecError

__all__ = ["extract"]


@click.group()
def extract() -> None:
    """Compute steering vectors from activations captured inside vLLM."""


def _lines(path: Path) -> list[str]:
    return [t for t in path.read_text().splitlines() if t.strip()]


def _layer_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SpecError(f"expected comma-separated integers, got {text!r}", field=option) from exc


def _extract_engine(model: str, layers: list[int], eager: bool, dtype: str | None):
    from vsteer._progress import step
    from vsteer.engine.llm import LLM

    # One capture pass, then exit: the engine runs in this process (no engine-core subprocess).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with step("starting the engine"):
        llm = LLM(model, enforce_eager=eager, capture_layers=layers, max_model_len=2048,
                  **({"dtype": dtype} if dtype else {}))
    for layer in layers:
        if not 0 <= layer < llm.model_shape.num_layers:
            raise SpecError(f"layer {layer} is out of range 0..{llm.model_shape.num_layers - 1}", field="--layers")
    return llm


def _capturing():
    from vsteer._progress import step

    return step("capturing activations")


def _write(llm, vector, output: Path, name: str | None) -> None:
    from vsteer.models import model_info
    from vsteer.vectors import save_vector

    hint = model_info(llm.model_path).model_type if output.suffix == ".gguf" else None
    save_vector(vector, output, model_hint=hint)
    if name:
        llm.register_vector(name, vector)
    click.echo(f"wrote {output} ({vector.method}, layers {sorted(vector.layers)}, sha256 {vector.sha256[:12]})"
               + (f", stored as {name!r}" if name else ""), err=True)


_model_opt = click.option("--model", default="smollm2", show_default=True, help="Alias or local HF folder.")
_out_opt = click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help=".safetensors or .gguf")
_name_opt = click.option("--name", default=None, help="Also store the vector under this name (usable in specs).")
_eager_opt = click.option("--eager/--compile", default=True, show_default=True)
_dtype_opt = click.option("--dtype", default=None,
                          help="Engine dtype for the capture pass [default: auto; float32 on a CPU without native bfloat16].")
_text_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@extract.command("caa")
@_model_opt
@click.option("--positive", type=_text_file, help="Mean-difference form: one positive text per line.")
@click.option("--negative", type=_text_file, help="Mean-difference form: one negative text per line.")
@click.option("--items", type=_text_file,
              help='A/B form (the paper): JSONL of {"question", "matching": "A"|"B"}, options in the question.')
@click.option("--layers", required=True, help="Comma-separated decoder layers, e.g. 10 or 8,10,12.")
@click.option("--pooling", type=click.Choice(["mean", "last"]), default="mean", show_default=True,
              help="Mean-difference form: pool each text by its mean or its last token.")
@_out_opt
@_name_opt
@_eager_opt
@_dtype_opt
def extract_caa(model: str, positive: Path | None, negative: Path | None, items: Path | None, layers: str,
                pooling: str, output: Path, name: str | None, eager: bool, dtype: str | None) -> None:
    """CAA: A/B items (--items), or mean of POSITIVE texts minus mean of NEGATIVE texts."""
    from vsteer.methods import ABItem, caa_vector, mean_difference

    if (items is None) == (positive is None or negative is None):
        raise SpecError("give either --items, or both --positive and --negative", field="--items")
    layer_ids = _layer_list(layers, "--layers")
    if items is not None:
        ab = []
        for lineno, line in enumerate(_lines(items), start=1):
            row = json.loads(line)
            matching = row.get("matching")
            if matching not in ("A", "B") or not isinstance(row.get("question"), str):
                raise SpecError('each line needs "question" and "matching": "A" or "B"', field=f"--items line {lineno}")
            ab.append(ABItem(row["question"], matching, "B" if matching == "A" else "A"))
        llm = _extract_engine(model, layer_ids, eager, dtype)
        with _capturing():
            vector = caa_vector(llm, ab, layer_ids, model=llm.model_shape.name)
    else:
        llm = _extract_engine(model, layer_ids, eager, dtype)
        with _capturing():
            vector = mean_difference(llm, _lines(positive), _lines(negative), layer_ids, pooling=pooling,
                                     model=llm.model_shape.name)
    _write(llm, vector, output, name)


@extract.command("sas")
@_model_opt
@click.option("--sae", "sae_ref", required=True, help="SAE: a name in the SAE store (vsteer sae list) or a path.")
@click.option("--pairs", required=True, type=_text_file,
              help='JSONL of {"prompt", "positive", "negative"}: a prompt with a completion showing the behaviour and one showing its opposite.')
@click.option("--tau", default=0.7, show_default=True, help="Keep features active in at least this fraction of rows.")
@click.option("--rows", type=click.Choice(["example", "token"]), default="example", show_default=True,
              help="One code row per example (mean over its completion tokens) or per completion token.")
@_out_opt
@_name_opt
@_eager_opt
@_dtype_opt
def extract_sas(model: str, sae_ref: str, pairs: Path, tau: float, rows: str, output: Path, name: str | None,
                eager: bool, dtype: str | None) -> None:
    """SAS (Bayat et al.): a sparse vector in the SAE's feature space; apply it with op "sas"."""
    from vsteer.methods.sas import ContrastPair, sas_vector
    from vsteer.sae import SaeStore

    if output.suffix != ".safetensors":
        raise SpecError("a SAS vector lives in SAE feature space: write it as .safetensors, not a GGUF control vector",
                        field="--output")
    items = []
    for lineno, line in enumerate(_lines(pairs), start=1):
        row = json.loads(line)
        if not all(isinstance(row.get(k), str) for k in ("prompt", "positive", "negative")):
            raise SpecError('each line needs string "prompt", "positive" and "negative"', field=f"--pairs line {lineno}")
        items.append(ContrastPair(row["prompt"], row["positive"], row["negative"]))
    store = SaeStore()
    sae = store.resolve(sae_ref)
    sae_name = sae_ref if sae_ref in store else (sae.config.name or Path(sae_ref).stem)
    llm = _extract_engine(model, [sae.layer], eager, dtype)
    with _capturing():
        vector = sas_vector(llm, sae, items, tau=tau, rows=rows, sae_name=sae_name, model=llm.model_shape.name)
    _write(llm, vector, output, name)
    click.echo(f"support {vector.provenance['support']} of {sae.d_sae} features; use "
               f'{{"op": "sas", "vector": ..., "sae": "{sae_name}"}}', err=True)


@extract.command("actadd")
@_model_opt
@click.option("--positive", required=True, help='The positive prompt, e.g. "Love".')
@click.option("--negative", required=True, help='The negative prompt, e.g. "Hate".')
@click.option("--layer", required=True, type=int, help="vsteer layer L (output of layer L = the paper's block L+1).")
@click.option("--coefficient", default=1.0, show_default=True, help="c in h_A = c (h+ - h-).")
@_out_opt
@_name_opt
@_eager_opt
@_dtype_opt
def extract_actadd(model: str, positive: str, negative: str, layer: int, coefficient: float, output: Path,
                   name: str | None, eager: bool, dtype: str | None) -> None:
    """ActAdd: per-position difference of a prompt pair, added front-aligned on the prompt pass."""
    from vsteer.methods import actadd_vector

    llm = _extract_engine(model, [layer], eager, dtype)
    with _capturing():
        vector = actadd_vector(llm, positive, negative, layer, coefficient=coefficient, model=llm.model_shape.name)
    _write(llm, vector, output, name)


@extract.command("pca")
@_model_opt
@click.option("--positive", required=True, type=_text_file, help="One text per line; line i pairs with --negative line i.")
@click.option("--negative", required=True, type=_text_file)
@click.option("--layers", required=True, help="Comma-separated decoder layers.")
@click.option("--mode", type=click.Choice(["diff", "center"]), default="center", show_default=True, help="repeng's pca_diff / pca_center.")
@click.option("--pooling", type=click.Choice(["mean", "last"]), default="last", show_default=True)
@_out_opt
@_name_opt
@_eager_opt
@_dtype_opt
def extract_pca(model: str, positive: Path, negative: Path, layers: str, mode: str, pooling: str, output: Path,
                name: str | None, eager: bool, dtype: str | None) -> None:
    """PCA of paired activations (repeng), sign so the positive side projects positive."""
    from vsteer.methods import pca_vector

    layer_ids = _layer_list(layers, "--layers")
    llm = _extract_engine(model, layer_ids, eager, dtype)
    with _capturing():
        vector = pca_vector(llm, _lines(positive), _lines(negative), layer_ids, mode=mode, pooling=pooling,
                            model=llm.model_shape.name)
    _write(llm, vector, output, name)


@extract.command("condition")
@_model_opt
@click.option("--positive", required=True, type=_text_file, help="Prompts where the condition holds, one per line.")
@click.option("--negative", required=True, type=_text_file, help="Prompts where it does not, one per line.")
@click.option("--layers", required=True, help="Comma-separated decoder layers, e.g. 4,6,8.")
@click.option("--method", type=click.Choice(["pca-center", "mean-difference"]), default="pca-center", show_default=True,
              help="pca-center (IBM's) pairs line i of --positive with line i of --negative.")
@_out_opt
@_name_opt
@_eager_opt
@_dtype_opt
def extract_condition(model: str, positive: Path, negative: Path, layers: str, method: str, output: Path,
                      name: str | None, eager: bool, dtype: str | None) -> None:
    """CAST condition vectors from two prompt sets, each prompt mean-pooled (then `vsteer condition search`)."""
    from vsteer.methods import condition_vector

    layer_ids = _layer_list(layers, "--layers")
    pos, neg = _lines(positive), _lines(negative)
    if method == "pca-center" and len(pos) != len(neg):
        raise SpecError(f"pca-center pairs the lines: {len(pos)} positive, {len(neg)} negative (give as many, "
                        "or --method mean-difference)", field="--negative")
    llm = _extract_engine(model, layer_ids, eager, dtype)
    with _capturing():
        vector = condition_vector(llm, pos, neg, layer_ids, method=method, model=llm.model_shape.name)
    _write(llm, vector, output, name)


@extract.command("sara")
@_model_opt
@click.option("--attract", required=True, help="Text whose activations steered prompts move toward.")
@click.option("--repel", required=True, help="Text whose activations steered prompts move away from.")
@click.option("--layer", required=True, type=int)
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="SARA set (.safetensors)")
@_eager_opt
@_dtype_opt
def extract_sara(model: str, attract: str, repel: str, layer: int, output: Path, eager: bool, dtype: str | None) -> None:
    """SARA set: SVD-reduced attract/repel activations; use it as {"op": "sara", "vector": OUTPUT}."""
    from vsteer.methods import SaraSet

    llm = _extract_engine(model, [layer], eager, dtype)
    with _capturing():
        att, rep = llm.capture([attract, repel], [layer])
    sara_set = SaraSet.from_activations(att[layer].double().T, rep[layer].double().T,
                                        provenance={"attract": attract, "repel": repel, "layer": layer, "model": llm.model_shape.name})
    sara_set.save(output)
    click.echo(f"wrote {output} (SARA set at layer {layer})", err=True)
