"""Fixtures of the dataset-job tests: a small dataset with good and bad rows, and its reference run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vsteer.jobs import RolloutJob, generate_chunk, run_job
from vsteer.jobs.rollouts import ChunkResult


def rows(love: str) -> list:
    steer = {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 8.0}]}
    return [
        {"prompt": "I think that", "max_tokens": 6},
        {"prompt": "I think that", "steering": steer, "max_tokens": 6},
        {"id": "chat-1", "messages": [{"role": "user", "content": "Say something nice."}], "max_tokens": 6},
        {"prompt": "Once upon a time", "temperature": 0.9, "top_p": 0.9, "n": 3, "max_tokens": 6},
        {"prompt": "The weather is", "steering": {"interventions": [{"op": "add", "vector": "no-such-vector"}]}},
        {"prompt": "My friend", "steering": {"interventions": [{"op": "add", "vector": love, "layers": [99]}]}},
        {"prompt": "word " * 600, "max_tokens": 4},
        "not an object",
        {"prompt": "Today I feel", "steering": steer, "temperature": 0.7, "seed": 1234, "max_tokens": 6, "logprobs": True},
        {"prompt": "Hello", "bogus_field": 1},
        {"prompt": "My neighbour is", "steering": steer, "max_tokens": 6, "n": 2, "temperature": 1.0},
    ]


def write_input(path: Path, data: list) -> Path:
    lines = [json.dumps(r) for r in data]
    lines.insert(5, "{not json")  # a malformed line in the middle
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """Equal records; logprobs within float32 noise (other chunkings batch requests differently)."""
    drop = lambda r: {k: v for k, v in r.items() if k != "logprobs"}  # noqa: E731
    assert [drop(r) for r in got] == [drop(r) for r in want]
    for g, w in zip(got, want):
        assert (g["logprobs"] is None) == (w["logprobs"] is None)
        assert g["logprobs"] is None or max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) < 1e-3


def in_process(llm):
    def run(chunks, seed):
        for c in chunks:
            yield ChunkResult(c.index, *generate_chunk(llm, c.rows, seed))
    return run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, directions):
    root = tmp_path_factory.mktemp("rollouts")
    return write_input(root / "in.jsonl", rows(directions["love"].sha256))


@pytest.fixture(scope="module")
def reference(dataset, eager_llm, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    summary = run_job(RolloutJob(dataset, out, seed=7, chunk_rows=4), in_process(eager_llm), progress=False)
    return out, summary


