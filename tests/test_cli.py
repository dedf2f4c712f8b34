"""The `vsteer` command line, run as a real subprocess against the real default model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm import SamplingParams

from tests.conftest import subprocess_env
from vsteer import load_vector

VSTEER = [sys.executable, "-m", "vsteer.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*VSTEER, *args], capture_output=True, text=True, timeout=600, env=subprocess_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"vsteer {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def test_models_path(model_path):
    out = run("models", "path", "smollm2")
    assert out.stdout.strip() == model_path
    assert (Path(out.stdout.strip()) / "config.json").is_file()


@pytest.fixture(scope="module")
def caa_vector(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "pos.txt").write_text("I love you.\nWhat a kind and lovely friend.\n")
    (root / "neg.txt").write_text("I hate you.\nWhat a cruel and awful enemy.\n")
    out = root / "love.safetensors"
    run("extract", "caa", "--model", "smollm2", "--positive", str(root / "pos.txt"),
        "--negative", str(root / "neg.txt"), "--layers", "10", "--output", str(out))
    return out


def test_extract_caa_writes_a_vector_with_metadata(caa_vector, eager_llm):
    from vsteer.methods import mean_difference

    v = load_vector(caa_vector)
    assert sorted(v.layers) == [10] and v.hidden_size == 576 and v.method == "caa-mean-difference"
    assert v.model == "SmolLM2-135M-Instruct" and v.provenance["pooling"] == "mean"
    # the same extraction in this process (float32 engine vs the CLI's bf16 one) points the same way
    ref = mean_difference(eager_llm, ["I love you.", "What a kind and lovely friend."],
                          ["I hate you.", "What an cruel and awful enemy.".replace("an cruel", "a cruel")], [10])
    cos = float(ref.layers[10] @ v.layers[10] / (ref.layers[10].norm() * v.layers[10].norm()))
    assert cos > 0.99


BAD_ROW = {"prompt": "hi", "steering": {"interventions": [{"op": "add", "vector": [0.0] * 576, "layers": [99]}]}}


def test_generate_jsonl_matches_python_api_and_a_bad_row_goes_to_the_errors_file(tmp_path, caa_vector, eager_llm):
    rows = [
        {"prompt": "I think that", "steering": None, "max_tokens": 8, "temperature": 0.0},
        {"prompt": "I think that", "steering": {"interventions": [{"op": "add", "vector": str(caa_vector), "scale": 4.0}]}, "max_tokens": 8, "temperature": 0.0},
        {"prompt": "My neighbour is", "steering": {"interventions": [{"op": "add", "vector": [0.1] * 576, "layers": [5, 6], "scale": 3.0}]}, "max_tokens": 8, "temperature": 0.0},
        {"prompt": "Once upon a time", "steering": None, "max_tokens": 8, "temperature": 0.8, "seed": 7},
        {"prompt": "I think that", "steering": {"interventions": [{"op": "add", "vector": str(caa_vector), "scale": 8.0,
                                                                   "schedule": {"kind": "exp", "half_life": 3}}]},
         "max_tokens": 8, "temperature": 0.0},
        *({"prompt": "I think that", "steering": {"interventions": [
            {"op": "add", "vector": str(caa_vector), "scale": 8.0,
             "when": {"vector": str(caa_vector), "layer": 12, "threshold": -1.0, "compare": compare}}]},
          "max_tokens": 8, "temperature": 0.0} for compare in ("above", "below")),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [*rows, BAD_ROW]) + "\n")
    # no --model: the default model
    proc = run("generate", "--input", str(src), "--output", str(dst), "--eager", "--dtype", "float32", "--max-slots", "4")
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [g["prompt"] for g in got] == [r["prompt"] for r in rows]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"], seed=r.get("seed")) for r in rows]
    want = eager_llm.generate([r["prompt"] for r in rows], params, steering=[r["steering"] for r in rows])
    for g, w in zip(got, want):
        assert g["token_ids"] == list(w.outputs[0].token_ids)
        assert g["text"] == w.outputs[0].text
    assert got[0]["token_ids"] != got[1]["token_ids"], "the steered row must differ from the unsteered one"
    # --condition-layers auto gave the engine layer 12: the gate that always holds steers, the other never
    assert got[5]["token_ids"] != got[0]["token_ids"] and got[6]["token_ids"] == got[0]["token_ids"]
    # the bad row is reported with its row, field and reason; every other row was answered
    assert "1 bad rows" in proc.stderr
    [error] = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert error["row_id"] == str(len(rows)) and error["field"] == "steering.interventions.0.layers"
    assert "layer 99 is out of range" in error["error"]


def test_cli_error_line_and_exit_code(tmp_path):
    proc = run("generate", "--input", str(tmp_path), "--output", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "is a directory" in proc.stderr
    proc = run("extract", "caa", "--layers", "x,1", "--positive", __file__, "--negative", __file__,
               "--output", str(tmp_path / "v.safetensors"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "SpecError: --layers: expected comma-separated integers, got 'x,1'"


def test_extract_actadd_and_sara_then_steer_by_name(tmp_path, eager_llm, monkeypatch):
    monkeypatch.setenv("VSTEER_VECTOR_STORE", str(eager_llm.store.root))  # the CLI stores where the engine reads
    run("extract", "actadd", "--positive", "Love", "--negative", "Hate", "--layer", "5",
        "--coefficient", "5", "--output", str(tmp_path / "actadd.safetensors"), "--name", "love-actadd", "--dtype", "float32")
    run("extract", "sara", "--attract", "I love everyone.", "--repel", "I hate everyone.", "--layer", "12",
        "--output", str(tmp_path / "sara.safetensors"), "--dtype", "float32")
    v = load_vector(tmp_path / "actadd.safetensors")
    assert v.method == "actadd" and v.num_positions is not None and eager_llm.store.resolve("love-actadd") == v.sha256
    params = SamplingParams(max_tokens=8, temperature=0.0)
    by_name = eager_llm.generate(["I think that"], params, steering={"interventions": [{"op": "add", "vector": "love-actadd"}]})
    by_path = eager_llm.generate(["I think that"], params, steering={"interventions": [{"op": "add", "vector": str(tmp_path / "actadd.safetensors")}]})
    assert by_name[0].outputs[0].token_ids == by_path[0].outputs[0].token_ids
    sara = {"interventions": [{"op": "sara", "vector": str(tmp_path / "sara.safetensors"), "layers": [12], "scale": 1.0}]}
    inline = {"interventions": [{"op": "sara", "attract": "I love everyone.", "repel": "I hate everyone.", "layers": [12], "scale": 1.0}]}
    from_file, from_texts = (eager_llm.generate(["I think that"], params, steering=s)[0] for s in (sara, inline))
    assert from_file.outputs[0].token_ids == from_texts.outputs[0].token_ids


def test_extract_condition_and_search_match_the_python_api(tmp_path, eager_llm):
    """`vsteer extract condition` then `vsteer condition search` (two engines in subprocesses) give
    the vector and the per-layer best points that the Python API computes here."""
    from vsteer.methods.condition import best_point, condition_vector, search_condition

    travel = ["Where should I go on vacation in Spain?", "How do I book a cheap flight to Rome?",
              "Plan a week of sightseeing in Tokyo.", "Which beaches in Greece should I visit?"]
    other = ["How do I bake bread?", "What is the derivative of x squared?", "How do I fix a leaking tap?",
             "Explain how vaccines work."]
    (tmp_path / "pos.txt").write_text("\n".join(travel) + "\n")
    (tmp_path / "neg.txt").write_text("\n".join(other) + "\n")
    out = tmp_path / "cond.safetensors"
    run("extract", "condition", "--positive", str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt"),
        "--layers", "6,12", "--output", str(out), "--dtype", "float32")
    v = load_vector(out)
    assert v.method == "cast-condition-pca-center" and sorted(v.layers) == [6, 12]
    ref = condition_vector(eager_llm, travel, other, [6, 12])
    for layer in (6, 12):
        assert float(ref.layers[layer] @ v.layers[layer]) > 0.999
    proc = run("condition", "search", "--vector", str(out), "--positive", str(tmp_path / "pos.txt"),
               "--negative", str(tmp_path / "neg.txt"), "--plot", str(tmp_path / "search.png"),
               "--json", str(tmp_path / "search.json"), "--dtype", "float32")
    points = search_condition(eager_llm, v, travel, other, [6, 12])
    got = json.loads((tmp_path / "search.json").read_text())
    for mine, theirs in zip(points, got["points"]):
        assert (theirs["layer"], theirs["compare"], theirs["f1"]) == (mine.layer, mine.compare, mine.f1)
        assert abs(theirs["threshold"] - mine.threshold) < 1e-4
    assert got["best"] == best_point(points).layer and f'"layer": {got["best"]}' in proc.stdout
    assert (tmp_path / "search.png").stat().st_size > 0
