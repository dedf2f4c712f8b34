"""`vsteer effects measure | fit | target` as real subprocesses, then the targeted vector steers."""

from __future__ import annotations

import json

from vllm import SamplingParams

from tests.test_cli import run


def _summary(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))


def test_measure_fit_target_then_steer(tmp_path, eager_llm, sae_store_dir, monkeypatch):
    from vsteer.effects.data import load_effects

    monkeypatch.setenv("VSTEER_SAE_STORE", str(sae_store_dir))
    monkeypatch.setenv("VSTEER_VECTOR_STORE", str(eager_llm.store.root))
    out = tmp_path / "fx"
    proc = run("effects", "measure", "--sae", "test-relu", "--out", str(out), "--features", "0:12", "--scale", "6",
               "--rollouts", "4", "--groups", "2", "--tokens", "4", "--chunk-size", "6", "--eager",
               "--dtype", "float32", "--max-num-seqs", "32")
    summary = _summary(proc.stdout)
    assert summary["complete"] and summary["chunks"] == 2 and "Top effects of vector 0" in proc.stdout
    data = load_effects(out)
    # the probes live in the job's own vector store, not in the user's
    assert len(list((out / "probe-vectors").glob("*.safetensors"))) == 12
    assert data.X.shape == (12, 576) and data.layer == 10 and data.scales.tolist() == [6.0] * 12
    again = _summary(run("effects", "measure", "--sae", "test-relu", "--out", str(out), "--features", "0:12", "--scale", "6",
                           "--rollouts", "4", "--groups", "2", "--tokens", "4", "--chunk-size", "6", "--eager",
                           "--dtype", "float32", "--max-num-seqs", "32").stdout)
    assert again["resumed"] == 2 and again["rollouts"] == 0  # a rerun finds everything done
    curve = json.loads(run("effects", "curve", str(out), "--heldout", str(out), "--vectors", "6,12", "--plot",
                           str(tmp_path / "curve.png")).stdout)
    assert [(r["rollouts"], r["vectors"]) for r in curve["rows"]] == [(2, 6), (2, 12), (4, 6), (4, 12)]
    assert curve["heldout_split_half"]["rollouts_per_half"] == 2 and (tmp_path / "curve.png").stat().st_size > 0
    approx = tmp_path / "approx.safetensors"
    run("effects", "fit", str(out), "--out", str(approx), "--method", "lstsq", "--test-fraction", "0.25", "--no-plot")
    vec = tmp_path / "target.safetensors"
    feature = int(data.Y.norm(dim=0).argmax())  # a feature the measured vectors did move
    run("effects", "target", "--approximator", str(approx), "--feature", str(feature), "--sae", "test-relu",
        "--output", str(vec), "--name", "target-f3")
    spec = {"interventions": [{"op": "add", "vector": "target-f3", "scale": 40.0}]}
    params = SamplingParams(max_tokens=8, temperature=0.0)
    steered, plain = eager_llm.generate(["I think"] * 2, params, steering=[spec, None])
    assert steered.outputs[0].token_ids != plain.outputs[0].token_ids
    bad = run("effects", "measure", "--sae", "test-relu", "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode != 0 and "--scale" in bad.stderr
    bad = run("effects", "measure", "--sae", "test-relu", "--out", str(tmp_path / "bad"), "--scale", "6", "--rollouts", "3",
              "--groups", "2", check=False)
    assert bad.returncode != 0 and "--groups" in bad.stderr and not (tmp_path / "bad" / "job.json").exists()
    bad = run("effects", "measure", "--sae", "test-relu", "--out", str(tmp_path / "bad"), "--scale", "6",
              "--seeds", "per-vector", check=False)  # per-vector seeds need the independent baseline
    assert bad.returncode != 0 and "--seeds" in bad.stderr and not (tmp_path / "bad" / "job.json").exists()
