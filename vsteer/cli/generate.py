"""``vsteer generate``: resumable steered rollout datasets (a thin adapter over :mod:`vsteer.jobs`)."""

from __future__ import annotations

from pathlib import Path

import click

from vsteer.cli._common import layers_option, ray_options

__all__ = ["generate"]


@click.command()
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
@click.option("--dtype", default=None, help="Engine dtype [default: auto; float32 on a CPU without native bfloat16].")
@click.option("--max-model-len", default=2048, show_default=True)
@click.option("--condition-layers", default="auto", show_default=True,
              help='Layers where conditional steering ("when") reads the prompt: "auto" (those the rows name) or a comma list.')
@click.option("--seed", default=0, show_default=True, help="Run seed; each sample's seed derives from it and the row id.")
@click.option("--chunk-rows", default=256, show_default=True, help="Rows per unit of work (and of resume).")
@ray_options
@click.option("--overwrite", is_flag=True, help="Discard the parts of an earlier run with other settings.")
def generate(model: str, input_path: Path, output_path: Path, max_slots: int | None, eager: bool, dtype: str | None,
             max_model_len: int, condition_layers: str, seed: int, chunk_rows: int, use_ray: bool, workers: int, cpus_per_worker: float,
             gpus_per_worker: float, ray_address: str | None, overwrite: bool) -> None:
    """Generate for every row of a dataset, each row with its own steering. Rerun the same command
    to resume an interrupted run."""
    from vsteer.jobs import RolloutJob, ray_executor, run_job

    engine = {"enforce_eager": eager, "max_model_len": max_model_len}
    if dtype is not None:
        engine["dtype"] = dtype
    if max_slots is not None:
        engine["max_slots"] = max_slots
    layers = _condition_layers(condition_layers, input_path)
    if layers:
        engine["condition_layers"] = layers
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


def _condition_layers(text: str, input_path: Path) -> list[int]:
    """``--condition-layers``: "auto" -> the layers the input's rows name in ``when``; else a list."""
    if text.strip().lower() == "auto":
        from vsteer.jobs.io import iter_rows
        from vsteer.jobs.rows import condition_layers

        return condition_layers(iter_rows(input_path))
    return layers_option(text, "--condition-layers", allow_all=False) or []
