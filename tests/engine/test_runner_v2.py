"""Steering on vLLM's Model Runner V2 (the only runner from vLLM 0.34 on) through its adapter
(vsteer/engine/runner_v2.py), on this CPU through the Triton-interpreter harness of tests/_v2_site
(in a child process: the harness must not reach this process's V1 engines).

A mixed batch of plain, additive, ablating, scheduled and gated requests on V2 equals each request
alone on V2 and the same batch on the session's V1 engine (which the rest of the suite checks
against HF float64 references), tokens and logprobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import subprocess_env

LOGPROB_TOL = 1e-4


def _unit(seed: int, norm: float) -> list[float]:
    v = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm() * norm).tolist()


def test_a_mixed_batch_on_model_runner_v2_equals_each_request_alone_and_v1(eager_llm, tmp_path):
    from vllm import SamplingParams

    v, w, c = _unit(0, 60.0), _unit(1, 1.0), _unit(2, 1.0)
    prompts = ["I think that", "I think that", "Once upon a time", "My favourite food is", "The weather today is",
               "The weather today is"]
    specs = [
        None,
        {"interventions": [{"op": "add", "vector": v, "layers": [10], "scale": 1.0}]},
        {"interventions": [{"op": "add", "vector": v, "layers": [5, 15], "scale": 0.8,
                            "schedule": {"kind": "linear", "from": 1.0, "to": 0.0, "over": 4}}]},
        {"interventions": [{"op": "ablate", "vector": w, "layers": [8, 9, 10]},
                           {"op": "add", "vector": v, "layers": [12], "scale": 0.5, "positions": "generated"}]},
        {"interventions": [{"op": "add", "vector": v, "layers": [14], "scale": 1.0,
                            "when": {"vector": c, "layer": 6, "threshold": -1.0, "compare": "above"}}]},
        {"interventions": [{"op": "add", "vector": v, "layers": [14], "scale": 1.0,
                            "when": {"vector": c, "layer": 6, "threshold": 1.0, "compare": "above"}}]},
    ]
    job = {"model": "smollm2", "store": str(tmp_path / "store"), "prompts": prompts, "specs": specs, "max_tokens": 6,
           "engine": {"condition_layers": [6]}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    site = Path(__file__).resolve().parents[1] / "_v2_site"
    env = {**subprocess_env(), "VSTEER_TEST_V2": "1", "VSTEER_LOG": "info",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("v2_child.py")), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["runner"] == ["vsteer.engine.runner_v2.V2RunnerAdapter", "vsteer.engine.runner.SteeringRunnerMixin",
                             "vllm.v1.worker.cpu.model_runner.CPUModelRunner"]

    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    v1 = [{"tokens": list(o.outputs[0].token_ids),
           "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
          for o in eager_llm.generate(prompts, params, steering=specs)]
    for i, (mixed, alone, ref) in enumerate(zip(got["mixed"], got["alone"], v1, strict=True)):
        for other in (alone, ref):
            assert mixed["tokens"] == other["tokens"], (i, mixed, other)
            assert max(abs(a - b) for a, b in zip(mixed["logprobs"], other["logprobs"])) < LOGPROB_TOL, i
    assert got["mixed"][1]["tokens"] != got["mixed"][0]["tokens"]  # the steering did something
    assert got["mixed"][4]["tokens"] != got["mixed"][5]["tokens"]  # the gate opened for one, not the other
