"""Steered rollout generation over a dataset: chunked, resumable, in-process or on a Ray pool.

The input is read as a stream and cut into chunks of ``chunk_rows`` rows. Each chunk is one
unit of work: every sample of every row becomes one request of a single mixed batch (each with its
own steering and seed), and the chunk's records and errors are written atomically to
``<output>.parts/``. A rerun with the same command skips chunks already written, so a crash or
Ctrl-C loses at most the chunks in flight; when every chunk is done the parts are merged in row
order into the output (JSONL or Parquet) and an errors file next to it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from vsteer._errors import EngineError, SpecError
from vsteer.jobs.io import (
    dataset_format,
    iter_rows,
    read_jsonl,
    write_jsonl_atomic,
    write_output,
)
from vsteer.jobs.pool import maybe_crash
from vsteer.jobs.rows import parse_row, sample_seed

MANIFEST_VERSION = 1


class Chunk(NamedTuple):
    index: int
    rows: list[tuple[int, Any]]  # (row number, raw row or the SpecError it raised)


@dataclass(frozen=True)
class RolloutJob:
    """What to generate and where. Identical settings are required to resume a run."""

    input: Path
    output: Path
    model: str = "smollm2"
    seed: int = 0
    chunk_rows: int = 256
    engine: dict = field(default_factory=dict)  # vsteer.LLM keyword arguments (dtype, enforce_eager, ...)

    @property
    def parts(self) -> Path:
        return self.output.with_name(self.output.name + ".parts")

    @property
    def errors(self) -> Path:
        return self.output.with_name(self.output.stem + ".errors.jsonl")

    def manifest(self) -> dict:
        stat = self.input.stat()
        return {
            "version": MANIFEST_VERSION,
            "input": str(self.input.resolve()),
            "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns,
            "model": self.model,
            "seed": self.seed,
            "chunk_rows": self.chunk_rows,
            "engine": self.engine,
        }

    def chunks(self) -> Iterator[Chunk]:
        rows: list[tuple[int, Any]] = []
        index = 0
        for item in iter_rows(self.input):
            rows.append(item)
            if len(rows) == self.chunk_rows:
                yield Chunk(index, rows)
                index, rows = index + 1, []
        if rows:
            yield Chunk(index, rows)


def count_rows(path: Path) -> int | None:
    """Rows in the input (cheap: a line scan or the Parquet footer)."""
    if dataset_format(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def generate_chunk(llm: Any, rows: list[tuple[int, Any]], run_seed: int) -> tuple[list[dict], list[dict]]:
    """Generate every sample of every row in one mixed batch; bad rows become error records.

    Returns:
        (records, errors): records in row order, then sample order.
    """
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    max_len = llm.max_model_len
    errors: list[dict] = []
    requests: list[tuple[str, int, str, list[int], Any, Any, str | None]] = []
    for number, raw in rows:
        row_id = str(raw.get("id", number)) if isinstance(raw, dict) else str(number)
        try:
            if isinstance(raw, SpecError):
                raise raw
            row_id, row = parse_row(raw, number)
            try:
                plan = llm.resolve(row.steering)
            except SpecError as exc:
                raise SpecError(exc.reason, field=f"steering.{exc.field}" if exc.field else "steering") from exc
            if row.messages is not None:
                text = tok.apply_chat_template([m.model_dump() for m in row.messages], tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                text = row.prompt
                ids = tok(text)["input_ids"]
            if not ids:
                raise SpecError("the prompt is empty", field="prompt")
            if len(ids) + row.max_tokens > max_len:
                raise SpecError(
                    f"prompt ({len(ids)} tokens) + max_tokens ({row.max_tokens}) exceeds the context "
                    f"(max_model_len {max_len})",
                    field="prompt",
                )
        except SpecError as exc:
            errors.append({"row": number, "row_id": row_id, "field": exc.field, "error": str(exc)})
            continue
        steering_hash = plan.hash if plan is not None else None
        for sample in range(row.n):
            seed = sample_seed(run_seed, row_id, sample, row.seed)
            params = SamplingParams(
                max_tokens=row.max_tokens,
                temperature=row.temperature,
                top_p=row.top_p,
                top_k=row.top_k,
                seed=seed,
                logprobs=0 if row.logprobs else None,
                ignore_eos=row.ignore_eos,
            )
            requests.append((row_id, sample, text, ids, plan, params, steering_hash))
    if not requests:
        return [], errors
    outs = llm.generate([r[3] for r in requests], [r[5] for r in requests], steering=[r[4] for r in requests])
    records = []
    for (row_id, sample, text, _, _, params, steering_hash), out in zip(requests, outs):
        comp = out.outputs[0]
        record = {
            "row_id": row_id,
            "sample": sample,
            "prompt": text,
            "text": comp.text,
            "token_ids": list(comp.token_ids),
            "finish_reason": comp.finish_reason,
            "steering_hash": steering_hash,
            "seed": params.seed,
            "logprobs": [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)] if comp.logprobs else None,
        }
        records.append(record)
    return records, errors


class ChunkResult(NamedTuple):
    index: int
    records: list[dict]
    errors: list[dict]


#: An executor maps chunks to results, in any order: the local one below, or the Ray pool.
Executor = Callable[[Iterator[Chunk], int], Iterator[ChunkResult]]


def local_executor(job: RolloutJob) -> Executor:
    """Run every chunk in this process on one engine."""
    from vsteer.engine.llm import LLM

    llm = LLM(job.model, **job.engine)

    def run(chunks: Iterator[Chunk], seed: int) -> Iterator[ChunkResult]:
        for chunk in chunks:
            yield ChunkResult(chunk.index, *generate_chunk(llm, chunk.rows, seed))

    return run


def run_job(job: RolloutJob, executor: Executor | None = None, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a rollout job; returns a summary.

    Raises:
        EngineError: the output folder holds parts of a job with other settings (use overwrite).
    """
    if overwrite and job.parts.exists():
        shutil.rmtree(job.parts)
    job.parts.mkdir(parents=True, exist_ok=True)
    manifest_path = job.parts / "job.json"
    manifest = job.manifest()
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous != manifest:
            changed = sorted(k for k in manifest if previous.get(k) != manifest[k])
            raise EngineError(
                f"{job.parts} holds a run with other settings ({', '.join(changed)}); rerun with the "
                "same command to resume, or pass --overwrite to start again"
            )
    else:
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, manifest_path)

    done = {int(p.name[6:14]) for p in job.parts.glob("chunk-*.jsonl") if not p.name.endswith(".errors.jsonl")}
    total = count_rows(job.input)
    pending = (c for c in job.chunks() if c.index not in done)
    executor = executor or local_executor(job)
    bar = _progress(total, len(done) * job.chunk_rows, enabled=progress)
    started, tokens, rows = time.monotonic(), 0, 0
    for result in executor(pending, job.seed):
        write_jsonl_atomic(_part(job, result.index, errors=True), result.errors)
        write_jsonl_atomic(_part(job, result.index), result.records)  # written last: marks the chunk done
        n_rows = len({r["row_id"] for r in result.records}) + len(result.errors)
        rows += n_rows
        tokens += sum(len(r["token_ids"]) for r in result.records)
        elapsed = max(time.monotonic() - started, 1e-9)
        bar.update(n_rows)
        bar.set_postfix_str(f"{rows / elapsed:.1f} rows/s, {tokens / elapsed:.0f} tok/s")
    bar.close()
    indices = sorted(int(p.name[6:14]) for p in job.parts.glob("chunk-*.jsonl") if not p.name.endswith(".errors.jsonl"))
    expected = list(range(len(indices)))
    if indices != expected:
        raise EngineError(f"chunks missing from {job.parts}: {sorted(set(expected) - set(indices))}")
    n_records = write_output(job.output, [_part(job, i) for i in indices])
    n_errors = write_jsonl_atomic(job.errors, (e for i in indices for e in read_jsonl(_part(job, i, errors=True))))
    shutil.rmtree(job.parts)
    return {"records": n_records, "errors": n_errors, "chunks": len(indices), "resumed_chunks": len(done),
            "output": str(job.output), "errors_file": str(job.errors), "tokens": tokens,
            "seconds": round(time.monotonic() - started, 2)}


def _part(job: RolloutJob, index: int, *, errors: bool = False) -> Path:
    return job.parts / (f"chunk-{index:08d}.errors.jsonl" if errors else f"chunk-{index:08d}.jsonl")


def _progress(total: int | None, initial: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total or initial), unit="row", disable=not enabled, dynamic_ncols=True)



def generate_chunk_task(llm: Any, rows: list[tuple[int, Any]], run_seed: int, index: int) -> tuple[list[dict], list[dict]]:
    """``generate_chunk`` as run by a pool actor (with the test-only fault hook)."""
    maybe_crash(index)
    return generate_chunk(llm, rows, run_seed)


def ray_executor(job: RolloutJob, workers: int, *, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                 address: str | None = None) -> Executor:
    """Run chunks on a Ray pool of ``workers`` engines; a chunk whose actor dies is retried."""
    from vsteer.jobs.pool import EnginePool

    pool = EnginePool(workers, {"model": job.model, **job.engine}, cpus_per_worker=cpus_per_worker,
                      gpus_per_worker=gpus_per_worker, address=address)

    def run(chunks: Iterator[Chunk], seed: int) -> Iterator[ChunkResult]:
        items = ((c.index, (c.rows, seed, c.index)) for c in chunks)
        try:
            for index, (records, errors) in pool.map("vsteer.jobs.rollouts.generate_chunk_task", items):
                yield ChunkResult(index, records, errors)
        finally:
            run.retries = pool.retries
            pool.shutdown()

    run.retries = 0
    run.pool = pool
    return run
