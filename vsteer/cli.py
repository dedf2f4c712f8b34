"""The ``vsteer`` command line: a thin adapter over the Python API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from vsteer._errors import SpecError, VsteerError


def _quiet_defaults() -> None:
    # vsteer never talks to a model hub or a usage-stats server.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    # On CPU, vLLM otherwise reserves 92% of RAM and refuses to start when others use memory.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


@click.group()
def cli() -> None:
    """vsteer: per-request activation steering inside vLLM."""
    _quiet_defaults()


@cli.command()
@click.option("--layer", default=10, show_default=True, help="Decoder layer to read and steer.")
@click.option("--scale", default=8.0, show_default=True, help="Scale of the unit-norm vector.")
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--eager/--compile", default=True, show_default=True, help="enforce_eager or torch.compile.")
def demo(layer: int, scale: float, max_tokens: int, eager: bool) -> None:
    """Steer the embedded SmolLM2 with a love-minus-hate vector computed inside vLLM."""
    from vsteer.demo import run_demo

    run_demo(layer=layer, scale=scale, max_tokens=max_tokens, eager=eager)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": ["--vsteer-help"]})
@click.option("--max-slots", type=int, default=None, help="Steering slots (default: --max-num-seqs).")
@click.option("--max-ablation-rank", default=1, show_default=True, help="Ablations per layer one request may compose.")
@click.option("--vector-store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Vector store folder (default: $VSTEER_VECTOR_STORE or ~/.cache/vsteer/vectors).")
@click.option("--max-abs-scale", default=1.0e4, show_default=True, help="Refuse specs with a larger |scale|.")
@click.option("--tenants", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help='JSON {"tenants": {name: {"keys": [...], "max_vectors": N, "max_configs_in_flight": N}}} '
                   "(or $VSTEER_TENANTS). Without it the server is single-tenant.")
@click.option("--sae", "saes", multiple=True, help="An SAE for sas ops (name in the SAE store or path); repeatable.")
@click.option("--max-sas-support", default=1024, show_default=True, help="Features one SAE layer may touch per step.")
@click.option("--sae-store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="SAE store folder (default: $VSTEER_SAE_STORE or ~/.cache/vsteer/saes).")
@click.option("--capture-layers", default="none", show_default=True,
              help='Layers with an activation-capture buffer: "none", "all" or a comma list like 10,12. '
                   "The server never captures by itself; each buffer costs max_num_batched_tokens x hidden x dtype bytes.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(max_slots: int | None, max_ablation_rank: int, vector_store: Path | None, max_abs_scale: float,
          tenants: Path | None, saes: tuple[str, ...], max_sas_support: int, sae_store: Path | None,
          capture_layers: str, vllm_args: tuple[str, ...]) -> None:
    """vLLM's OpenAI-compatible server with per-request steering: vsteer serve [MODEL] [vllm serve options].

    MODEL defaults to the embedded SmolLM2. Requests carry "steering": {...} in the body (extra_body
    of the OpenAI client) or "vllm_xargs": {"steering": "<JSON>"}. Options after MODEL go to vLLM.
    """
    from vsteer.server.serve import serve_main
    from vsteer.server.tenants import TENANTS_ENV, TenantsFile

    if tenants is not None:
        os.environ[TENANTS_ENV] = TenantsFile.model_validate_json(tenants.read_text()).model_dump_json()
    serve_main(vllm_args, max_slots=max_slots, max_ablation_rank=max_ablation_rank, vector_store=vector_store,
               max_abs_scale=max_abs_scale, saes=saes, max_sas_support=max_sas_support, sae_store=sae_store,
               capture_layers=_capture_layers(capture_layers))


def _capture_layers(text: str) -> list[int] | None:
    """``--capture-layers``: "none" -> [], "all" -> None (every steerable layer), "10,12" -> [10, 12]."""
    value = text.strip().lower()
    if value in ("", "none"):
        return []
    if value == "all":
        return None
    try:
        layers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f'expected "none", "all" or comma-separated layer numbers, got {text!r}',
                                 param_hint="--capture-layers") from None
    if any(layer < 0 for layer in layers):
        raise click.BadParameter("layers are 0 or more", param_hint="--capture-layers")
    return layers


@cli.group()
def models() -> None:
    """Local models."""


@models.command("path")
@click.argument("name", default="smollm2")
def models_path(name: str) -> None:
    """Print the local HF folder of NAME (preparing the default model if needed)."""
    from vsteer.models import resolve_model

    click.echo(resolve_model(name))


@cli.command()
@click.option("--model", default="smollm2", show_default=True, help="Alias or local HF folder.")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL or Parquet; each row {"prompt" | "messages", "steering", "max_tokens", "temperature", '
                   '"top_p", "top_k", "seed", "n", "logprobs", "id"}.')
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help='JSONL or Parquet; one record per sample, in row order: {"row_id", "sample", "prompt", "text", '
                   '"token_ids", "finish_reason", "steering_hash", "seed", "logprobs"}. Bad rows go to '
                   "<output stem>.errors.jsonl.")
@click.option("--max-slots", type=int, default=None, help="Steering slots (default: max_num_seqs).")
@click.option("--eager", is_flag=True, help="enforce_eager (no torch.compile).")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--max-model-len", default=2048, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Run seed; each sample's seed derives from it and the row id.")
@click.option("--chunk-rows", default=256, show_default=True, help="Rows per unit of work (and of resume).")
@click.option("--ray", "use_ray", is_flag=True, help="Fan chunks out over a Ray pool of engines.")
@click.option("--workers", default=2, show_default=True, help="Engine actors with --ray.")
@click.option("--cpus-per-worker", default=1.0, show_default=True)
@click.option("--gpus-per-worker", default=0.0, show_default=True)
@click.option("--ray-address", default=None, help="Join a running Ray cluster (default: start one locally).")
@click.option("--overwrite", is_flag=True, help="Discard the parts of an earlier run with other settings.")
def generate(model: str, input_path: Path, output_path: Path, max_slots: int | None, eager: bool, dtype: str,
             max_model_len: int, seed: int, chunk_rows: int, use_ray: bool, workers: int, cpus_per_worker: float,
             gpus_per_worker: float, ray_address: str | None, overwrite: bool) -> None:
    """Generate for every row of a dataset, each row with its own steering. Rerun the same command
    to resume an interrupted run."""
    from vsteer.jobs import RolloutJob, ray_executor, run_job

    engine = {"enforce_eager": eager, "dtype": dtype, "max_model_len": max_model_len}
    if max_slots is not None:
        engine["max_slots"] = max_slots
    job = RolloutJob(input_path, output_path, model=model, seed=seed, chunk_rows=chunk_rows, engine=engine)
    executor = None
    if use_ray:
        executor = ray_executor(job, workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                address=ray_address)
    summary = run_job(job, executor, overwrite=overwrite)
    click.echo(
        f"wrote {summary['records']} records to {output_path} ({summary['errors']} bad rows in "
        f"{summary['errors_file']}; {summary['resumed_chunks']} of {summary['chunks']} chunks resumed)",
        err=True,
    )


@cli.group()
def extract() -> None:
    """Compute steering vectors from activations captured inside vLLM."""


def _lines(path: Path) -> list[str]:
    return [t for t in path.read_text().splitlines() if t.strip()]


def _layer_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SpecError(f"expected comma-separated integers, got {text!r}", field=option) from exc


def _extract_engine(model: str, layers: list[int], eager: bool, dtype: str):
    from vsteer.engine.llm import LLM

    llm = LLM(model, enforce_eager=eager, capture_layers=layers, max_model_len=2048, dtype=dtype)
    for layer in layers:
        if not 0 <= layer < llm.model_shape.num_layers:
            raise SpecError(f"layer {layer} is out of range 0..{llm.model_shape.num_layers - 1}", field="--layers")
    return llm


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
_dtype_opt = click.option("--dtype", default="auto", show_default=True, help="Engine dtype for the capture pass.")
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
                pooling: str, output: Path, name: str | None, eager: bool, dtype: str) -> None:
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
        vector = caa_vector(llm, ab, layer_ids, model=llm.model_shape.name)
    else:
        llm = _extract_engine(model, layer_ids, eager, dtype)
        vector = mean_difference(llm, _lines(positive), _lines(negative), layer_ids, pooling=pooling, model=llm.model_shape.name)
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
                eager: bool, dtype: str) -> None:
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
                   name: str | None, eager: bool, dtype: str) -> None:
    """ActAdd: per-position difference of a prompt pair, added front-aligned on the prompt pass."""
    from vsteer.methods import actadd_vector

    llm = _extract_engine(model, [layer], eager, dtype)
    _write(llm, actadd_vector(llm, positive, negative, layer, coefficient=coefficient, model=llm.model_shape.name), output, name)


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
                name: str | None, eager: bool, dtype: str) -> None:
    """PCA of paired activations (repeng), sign so the positive side projects positive."""
    from vsteer.methods import pca_vector

    layer_ids = _layer_list(layers, "--layers")
    llm = _extract_engine(model, layer_ids, eager, dtype)
    vector = pca_vector(llm, _lines(positive), _lines(negative), layer_ids, mode=mode, pooling=pooling, model=llm.model_shape.name)
    _write(llm, vector, output, name)


@extract.command("sara")
@_model_opt
@click.option("--attract", required=True, help="Text whose activations steered prompts move toward.")
@click.option("--repel", required=True, help="Text whose activations steered prompts move away from.")
@click.option("--layer", required=True, type=int)
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="SARA set (.safetensors)")
@_eager_opt
@_dtype_opt
def extract_sara(model: str, attract: str, repel: str, layer: int, output: Path, eager: bool, dtype: str) -> None:
    """SARA set: SVD-reduced attract/repel activations; use it as {"op": "sara", "vector": OUTPUT}."""
    from vsteer.methods import SaraSet

    llm = _extract_engine(model, [layer], eager, dtype)
    att, rep = llm.capture([attract, repel], [layer])
    sara_set = SaraSet.from_activations(att[layer].double().T, rep[layer].double().T,
                                        provenance={"attract": attract, "repel": repel, "layer": layer, "model": llm.model_shape.name})
    sara_set.save(output)
    click.echo(f"wrote {output} (SARA set at layer {layer})", err=True)


from vsteer.cli_vectors import vectors  # noqa: E402  (a thin group with no heavy imports)

cli.add_command(vectors)
from vsteer.cli_effects import effects  # noqa: E402  (vLLM is imported by the subcommands that need it)

cli.add_command(effects)
from vsteer.cli_eval import eval_group  # noqa: E402

cli.add_command(eval_group)
from vsteer.cli_sae import sae  # noqa: E402

cli.add_command(sae)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, print ``ErrorName: message`` for vsteer errors and exit 1."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except VsteerError as exc:
        click.echo(f"{type(exc).__name__}: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
