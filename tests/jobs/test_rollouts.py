"""The dataset job on the real engine: rows in, records out, resumable, errors on the side."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.jobs.conftest import assert_same_records, in_process
from vsteer._errors import EngineError
from vsteer.jobs import RolloutJob, generate_chunk, run_job
from vsteer.jobs.io import read_jsonl
from vsteer.jobs.rollouts import ChunkResult

ROOT = Path(__file__).resolve().parents[2]


def test_records_errors_and_order(reference, tokenizer):
    out, summary = reference
    records = list(read_jsonl(out))
    errors = list(read_jsonl(out.with_name("out.errors.jsonl")))
    assert [(r["row_id"], r["sample"]) for r in records] == [
        ("0", 0), ("1", 0), ("chat-1", 0), ("3", 0), ("3", 1), ("3", 2), ("9", 0), ("11", 0), ("11", 1)]
    assert {e["row_id"]: e["field"] for e in errors} == {
        "4": "steering.interventions.0.vector", "5": "row", "6": "steering.interventions.0.layers",
        "7": "prompt", "8": "row", "10": "bogus_field"}
    assert "exceeds the context" in next(e for e in errors if e["row_id"] == "7")["error"]
    assert summary["records"] == 9 and summary["errors"] == 6
    by = {(r["row_id"], r["sample"]): r for r in records}
    assert by[("0", 0)]["text"] != by[("1", 0)]["text"] and by[("1", 0)]["steering_hash"]
    assert by[("0", 0)]["steering_hash"] is None
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say something nice."}], tokenize=False, add_generation_prompt=True)
    assert by[("chat-1", 0)]["prompt"] == chat
    assert by[("9", 0)]["seed"] == 1234 and len(by[("9", 0)]["logprobs"]) == len(by[("9", 0)]["token_ids"])
    assert len({by[("3", s)]["seed"] for s in range(3)}) == 3
    assert all(r["finish_reason"] in ("length", "stop") for r in records)


def test_same_samples_whatever_the_chunking(reference, dataset, eager_llm, tmp_path):
    out, _ = reference
    again = tmp_path / "again.jsonl"
    run_job(RolloutJob(dataset, again, seed=7, chunk_rows=3), in_process(eager_llm), progress=False)
    assert_same_records(list(read_jsonl(again)), list(read_jsonl(out)))


def test_interrupted_run_resumes_without_duplicates_or_gaps(reference, dataset, eager_llm, tmp_path):
    out, _ = reference
    target = tmp_path / "resumed.jsonl"
    job = RolloutJob(dataset, target, seed=7, chunk_rows=4)

    def dies_after_one(chunks, seed):
        for i, c in enumerate(chunks):
            if i == 1:
                raise KeyboardInterrupt
            yield ChunkResult(c.index, *generate_chunk(eager_llm, c.rows, seed))

    with pytest.raises(KeyboardInterrupt):
        run_job(job, dies_after_one, progress=False)
    assert (job.parts / "chunk-00000000.jsonl").exists() and not target.exists()
    summary = run_job(job, in_process(eager_llm), progress=False)
    assert summary["resumed_chunks"] == 1
    assert_same_records(list(read_jsonl(target)), list(read_jsonl(out)))
    assert not job.parts.exists()


def test_resume_with_other_settings_is_refused(dataset, eager_llm, tmp_path):
    target = tmp_path / "o.jsonl"
    RolloutJob(dataset, target, seed=7, chunk_rows=4).parts.mkdir(parents=True)
    (RolloutJob(dataset, target, seed=7, chunk_rows=4).parts / "job.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(EngineError, match="other settings"):
        run_job(RolloutJob(dataset, target, seed=7, chunk_rows=4), in_process(eager_llm), progress=False)


def test_parquet_in_and_out(reference, dataset, eager_llm, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, _ = reference
    good = []
    for number, line in enumerate(dataset.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "bogus_field" not in row:
            good.append({"id": str(row.get("id", number)), **{k: v for k, v in row.items() if k != "id"}})
    # Parquet has no "object or null" column: the steering spec travels as JSON text.
    columns = sorted({k for r in good for k in r})
    table = pa.Table.from_pylist([{k: (json.dumps(r[k]) if k == "steering" and k in r else r.get(k)) for k in columns}
                                  for r in good])
    src = tmp_path / "in.parquet"
    pq.write_table(table, src)
    dst = tmp_path / "out.parquet"
    run_job(RolloutJob(src, dst, seed=7, chunk_rows=4), in_process(eager_llm), progress=False)
    assert_same_records(pq.read_table(dst).to_pylist(), list(read_jsonl(out)))
    errors = list(read_jsonl(tmp_path / "out.errors.jsonl"))
    assert {e["row_id"] for e in errors} == {"4", "6", "7"}


def test_cli_killed_mid_run_then_resumed(reference, dataset, tmp_path, model_path, eager_llm):
    """A real `vsteer generate` process is killed with SIGKILL after its first chunk; the same
    command then finishes the job with exactly the records of an uninterrupted run."""
    out, _ = reference
    target = tmp_path / "cli.jsonl"
    cmd = [sys.executable, "-m", "vsteer.cli", "generate", "--model", model_path, "--input", str(dataset),
           "--output", str(target), "--eager", "--dtype", "float32", "--max-model-len", "512", "--seed", "7",
           "--chunk-rows", "1"]
    env = {**subprocess_env(), "VSTEER_VECTOR_STORE": str(eager_llm.store.root)}  # where the rows' vectors are
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    parts = target.with_name("cli.jsonl.parts")
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("chunk-*[0-9].jsonl"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("chunk-*[0-9].jsonl")))
    assert 2 <= done_before < 12 and not target.exists()
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
    assert_same_records(list(read_jsonl(target)), list(read_jsonl(out)))
