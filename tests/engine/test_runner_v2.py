"""Steering on vLLM's Model Runner V2 (the only runner from vLLM 0.34 on) through its adapter
(vsteer/engine/runner_v2.py), on this CPU through the Triton-interpreter harness of tests/_site
(in a child process: the harness must not reach this process's V1 engines).

A mixed batch of plain, additive, ablating, scheduled, gated and SAS requests on V2, with chunked
prefill (a 32-token step budget), equals each request alone on V2 (read back through the prefix
cache) and the same batch on the session's V1 engine (unchunked; the rest of the suite checks it
against HF float64 references), tokens and logprobs; V2's captures equal V1's; and a steered batch
that a small KV cache makes vLLM preempt on V2, with more configs than slots, gives the tokens of a
roomy V1 engine; a request that goes non-finite (tests/_faults.py) fails alone, as on V1; parallel sampling (n = 3, seeded) gives each choice of a single request with the
child's seed; LoRA adapter and steered requests in one batch equal HF + peft + hooks; and the
mixed batch equals HF steered by hooks in float64. The child's main and preempted engines run with
async scheduling, vLLM's default for V2 on GPUs (the harness lets a CPU engine keep it); the
other V2 engines here (``vsteer serve``, ``vsteer generate``, LoRA) schedule synchronously. ``vsteer serve`` on V2 serves concurrent
steered and plain requests as V1 does (stock vLLM's server on V2: tests/server/tenant_server)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
from vllm import SamplingParams

from tests._reference.agreement import LOGPROB_TOL as HF_LOGPROB_TOL  # float32 vLLM vs the HF reference
from tests._reference.hf_steering import greedy
from tests._reference import mixed_batch
from tests._reference.lora import LORA_CASES, check_lora_cases
from tests.conftest import harness_env, subprocess_env
from vsteer import schedules

LOGPROB_TOL = 1e-4
LORA_PROMPT = "Tell me about your day."


def _love(sha: str) -> dict:
    return {"interventions": [{"op": "add", "vector": sha, "layers": [10], "scale": 8.0}]}


def test_a_mixed_batch_on_model_runner_v2_equals_each_request_alone_and_v1(eager_llm, store_dir, sae_store_dir,
                                                                            directions, tmp_path, adapter_dir,
                                                                            peft_model, hf_model):
    from vllm import SamplingParams

    from vsteer import SteeringVector

    sae = eager_llm.saes["test-relu"]
    s = torch.zeros(sae.d_sae)
    s[[3, 40, 300]] = 6.0
    sas = eager_llm.store.put(SteeringVector({sae.layer: s}, hidden_size=sae.d_sae, method="sas"))
    long, prompts, specs = mixed_batch.LONG, mixed_batch.PROMPTS, mixed_batch.specs(sas)
    v, w, c = mixed_batch.unit(0, 60.0), mixed_batch.unit(1, 1.0), mixed_batch.unit(2, 1.0)  # specs' vectors
    job = {"model": "smollm2", "store": str(store_dir), "prompts": prompts, "specs": specs, "max_tokens": 6,
           "capture_layers": [3, 15], "engine": {"async_scheduling": True, "condition_layers": [6], "saes": ["test-relu"], "effect_saes": ["test-relu"],
                                                  "sae_store": str(sae_store_dir), "max_num_batched_tokens": 32}}
    job["runs"] = _feature_runs(eager_llm, directions["love"].sha256, long)
    job["fault"] = _fault_job(directions["love"].sha256)
    # as tests/engine/test_preemption.py: ~170 tokens of KV for 8 requests growing to ~100 tokens, and
    # 6 steering configs for 5 slots (one waits for a slot)
    love = directions["love"].sha256
    tight_prompts = ["I think that", "The weather today is", "My best friend", "Once upon a time"] * 2
    tight_specs = [{"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": s}]} if s else None
                   for s in (8.0, -8.0, 0, 12.0, 4.0, 0, -4.0, 16.0)]
    job["preemption"] = {"prompts": tight_prompts, "specs": tight_specs, "max_tokens": 60, "engine": dict(
        max_model_len=128, block_size=32, max_num_seqs=8, max_slots=5, kv_cache_memory_bytes=8 * 2**20,
        enable_prefix_caching=False, async_scheduling=True)}
    job["lora"] = {"prompts": [LORA_PROMPT] * 4, "specs": [_love(love) if s else None for _, _, s in LORA_CASES],
                   "adapter": str(adapter_dir), "with_adapter": [a for _, a, _ in LORA_CASES],
                   "sampling_params": {"max_tokens": 10}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in subprocess_env().items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # the engines set their own
    env = {**env, **harness_env(v2=True, async_scheduling=True), "VSTEER_LOG": "info"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("v2_child.py")), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["async_scheduling"] is True  # as vLLM runs V2 on GPUs (the harness lets the CPU keep it)
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
    _check_hf_reference(hf_model, eager_llm.get_tokenizer(), prompts, got["mixed"], [
        [],
        [dict(op="add", direction=torch.tensor(v), layers=[10], scale=1.0)],
        [dict(op="add", direction=torch.tensor(v), layers=[5, 15], scale=0.8,
              schedule=schedules.as_tuple(specs[2]["interventions"][0]["schedule"]))],
        [dict(op="ablate", direction=torch.tensor(w), layers=[8, 9, 10]),
         dict(op="add", direction=torch.tensor(v), layers=[12], scale=0.5, positions="generated")],
        *([dict(op="add", direction=torch.tensor(v), layers=[14], scale=1.0, when={"combine": "any", "conditions": [
            {"vector": torch.tensor(c), "layer": 6, "threshold": t, "compare": "above", "pool": "mean"}]})] for t in (-1.0, 1.0)),
        [dict(op="add", direction=torch.tensor(v), layers=[10], scale=0.7, positions="prompt")],
        [dict(op="sas", sae=copy.deepcopy(sae).double(), s=s, scale=1.0, layers=[sae.layer])],
    ])
    assert got["mixed"][1]["tokens"] != got["mixed"][0]["tokens"]  # the steering did something
    assert got["mixed"][4]["tokens"] != got["mixed"][5]["tokens"]  # the gate opened for one, not the other
    assert got["alone"][6]["cached"] > 0  # the long prompt's second pass read its first pass's blocks
    preempted = got["preempted"]
    assert preempted["preemptions"] and preempted["preemptions"][0] > 0, "the KV cache was large enough"
    roomy = eager_llm.generate(tight_prompts, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True),
                               steering=tight_specs)
    assert preempted["tokens"] == [list(o.outputs[0].token_ids) for o in roomy]
    _check_feature_runs(eager_llm, job["runs"], got["runs"])
    lora_ids = eager_llm.get_tokenizer()(LORA_PROMPT)["input_ids"]
    check_lora_cases([(o["tokens"], o["logprobs"]) for o in got["lora"]["outputs"]], lora_ids, peft_model, hf_model,
                     [dict(op="add", direction=dict(directions["love"].layers), layers=[10], scale=8.0)], 10)
    _check_fault(eager_llm, job["fault"], got["fault"])
    for got_cap, want_cap in zip(got["captures"], eager_llm.capture(prompts, [3, 15]), strict=True):
        for layer in (3, 15):
            want = want_cap[layer]
            torch.testing.assert_close(torch.tensor(got_cap[str(layer)]), want,
                                       atol=1e-4 * float(want.norm(dim=-1).max()), rtol=1e-4)


def _check_hf_reference(hf_model, tok, prompts: list[str], got: list[dict], interventions: list[list[dict]]) -> None:
    """V2's greedy tokens and logprobs against HF steered by hooks in float64 (tests/_reference)."""
    for i, (prompt, out, items) in enumerate(zip(prompts, got, interventions, strict=True)):
        want, want_lp = greedy(hf_model, tok(prompt)["input_ids"], len(out["tokens"]), items)
        assert out["tokens"] == want, (i, out["tokens"], want)
        assert max(abs(a - b) for a, b in zip(out["logprobs"], want_lp)) < HF_LOGPROB_TOL, i


SCHEMA = {"type": "object", "properties": {"mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
                                           "reason": {"type": "string", "maxLength": 30}},
          "required": ["mood", "reason"], "additionalProperties": False}


def _feature_runs(eager_llm, love: str, long: str) -> list[dict]:
    """Batches for the V2 child after its mixed batch: feature-effect sums of steered and plain
    requests; steered and plain JSON-schema requests; and two turns of a conversation whose turn 2
    (turn 1 + its steered reply + a question, from V1) reads turn 1's KV from the prefix cache."""
    add = {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 8.0}]}
    late = {"interventions": [{"op": "add", "vector": love, "layers": [12], "scale": -6.0, "positions": "generated"}]}
    tok = eager_llm.get_tokenizer()
    turn1 = tok(long)["input_ids"]
    reply = eager_llm.generate([turn1], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                               steering=add)[0].outputs[0].token_ids
    turn2 = turn1 + list(reply) + tok(" And then?")["input_ids"]
    return [
        {"prompts": ["I think that", "The weather today is", "My best friend"], "specs": [add, None, late],
         "sampling_params": {"max_tokens": 9, "ignore_eos": True},
         "effects": [{"key": f"e{i}", "start": 1, "tokens": 8} for i in range(3)]},
        {"prompts": ["Answer in JSON with your mood and a reason. How was your day?"] * 2, "specs": [add, None],
         "sampling_params": {"max_tokens": 16}, "json_schema": SCHEMA},
        {"prompts": [turn1], "specs": [add], "sampling_params": {"max_tokens": 12, "ignore_eos": True}},
        {"prompts": [turn2], "specs": [add], "sampling_params": {"max_tokens": 8, "ignore_eos": True}},
        # parallel sampling, compared on V2 itself (V2 samples with its own kernels, not V1's)
        {"prompts": ["Once upon a time"], "specs": [add], "v2_only": True,
         "sampling_params": {"n": 3, "temperature": 1.0, "seed": 1234, "max_tokens": 8, "ignore_eos": True}},
        *({"prompts": ["Once upon a time"], "specs": [add], "v2_only": True,
           "sampling_params": {"temperature": 1.0, "seed": 1234 + i, "max_tokens": 8, "ignore_eos": True}}
          for i in range(3)),
    ]


def _fault_job(love: str) -> dict:
    """tests/engine/test_finite.py's defence-in-depth case, for the V2 child."""
    from tests import _faults

    return {"poisoned": "Numbers can overflow when a long chain of products grows without bound, " * 5 + "and then",
            "others": ["The capital of France is", "My favourite colour is", "Once upon a time there was"],
            "spec": {"interventions": [{"op": "add", "vector": love, "layers": [8], "scale": _faults.FAULT_SCALE}]}}


def _check_fault(eager_llm, job: dict, got: dict) -> None:
    """On V2 the request that went non-finite fails alone (422 naming steering); the plain request
    beside it and every request after it equal V1 without the fault; its blocks left the cache."""
    from vsteer.engine.failures import parse_failure

    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0)
    want = [{"tokens": list(o.outputs[0].token_ids),
             "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
            for o in eager_llm.generate(job["others"], params)]
    failed = got["mixed"][0]
    failure = parse_failure(failed["stop"])
    assert failed["finish"] == "error" and failure is not None and failed["tokens"] == [], failed
    assert failure.status == 422 and failure.field == "steering" and "non-finite" in failure.message
    for g, w in zip([got["mixed"][1], *got["after"]], [want[0], *want], strict=True):
        assert g["finish"] != "error" and g["tokens"] == w["tokens"], (g, w)
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) < LOGPROB_TOL
    assert got["clean"]["finish"] != "error" and got["clean"]["tokens"] and got["clean"]["cached"] == 0


def _assert_same_outputs(got: list[dict], want: list[dict]) -> None:
    """Two engines' outputs: the same tokens, logprobs within LOGPROB_TOL."""
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a["tokens"] == b["tokens"], (i, a, b)
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < LOGPROB_TOL, i


def _check_feature_runs(eager_llm, runs: list[dict], got: list[dict]) -> None:
    """Each V2 run equals the same run on V1: tokens, logprobs, effect counts and sums."""
    from tests.engine.v2_child import run_batch

    for i, (run, v2) in enumerate(zip(runs, got, strict=True)):
        if run.get("v2_only"):
            continue
        v1 = run_batch(eager_llm, run)
        _assert_same_outputs(v2["outputs"], v1["outputs"])
        assert sorted(v2["effects"]) == sorted(v1["effects"])
        for key, want in v1["effects"].items():
            have = v2["effects"][key]
            assert not have["partial"] and have["count"] == want["count"] > 0, (key, have["count"], want["count"])
            for layer, sums in want["sums"].items():
                torch.testing.assert_close(torch.tensor(have["sums"][layer]), torch.tensor(sums), atol=1e-2, rtol=1e-3)
    effects, structured, _, turn2, parallel, *singles = got
    assert parallel["outputs"][0]["choices"] == [single["outputs"][0]["tokens"] for single in singles]
    assert len({tuple(c) for c in parallel["outputs"][0]["choices"]}) > 1  # sampled, not greedy
    assert effects["outputs"][0]["tokens"] != effects["outputs"][1]["tokens"]
    steered, plain = structured["outputs"]  # the grammar may keep the tokens; the steering moves the logprobs
    assert steered["tokens"] != plain["tokens"] or max(abs(a - b) for a, b in zip(steered["logprobs"], plain["logprobs"])) > 1e-2
    assert turn2["outputs"][0]["cached"] > 0  # turn 2 read turn 1's KV


def test_vsteer_serve_steers_on_model_runner_v2(eager_llm, model_path, directions, tmp_path):
    """``vsteer serve`` on V2: concurrent steered and plain completions from the OpenAI client (one
    engine batch) equal vsteer.LLM on V1, and ``/metrics`` says the engine steers on V2. (Stock
    vLLM's server with vsteer's plugins runs on V2 for tests/server/tenant_server.)"""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import openai
    from vllm import SamplingParams

    from tests.conftest import start_serve
    from vsteer.server.process import stop

    love, wedding = directions["love"].sha256, directions["wedding"].sha256
    prompts = ["I think that", "The weather today is", "I think that", "My best friend"]
    specs = [{"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 8.0}]}, None,
             {"interventions": [{"op": "ablate", "vector": wedding, "layers": [4, 5]},
                                {"op": "add", "vector": love, "layers": [12], "scale": -6.0, "positions": "generated"}]},
             {"interventions": [{"op": "add", "vector": love, "layers": [8], "scale": 6.0,
                                 "schedule": {"kind": "linear", "from": 1.0, "to": 0.0, "over": 4}}]}]
    want = [o.outputs[0].text for o in eager_llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0),
                                                            steering=specs)]
    proc, base = start_serve(model_path, tmp_path / "server.log", store=eager_llm.store.root, max_model_len=256,
                             max_num_seqs=4, env=harness_env(v2=True))
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=300)

        def complete(i: int) -> str:
            extra = {} if specs[i] is None else {"extra_body": {"steering": specs[i]}}
            return client.completions.create(model="smollm2", prompt=prompts[i], max_tokens=6, temperature=0,
                                             **extra).choices[0].text

        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(complete, range(len(prompts))))
        assert got == want
        assert got[0] != got[2]  # the steering did something
        deadline, metrics = time.time() + 20, ""
        while 'vsteer_runner_info{runner="v2"} 1.0' not in metrics and time.time() < deadline:
            time.sleep(0.5)
            metrics = httpx.get(base + "/metrics").text
        assert 'vsteer_runner_info{runner="v2"} 1.0' in metrics, [m for m in metrics.splitlines() if "vsteer" in m]
    finally:
        stop(proc)
    assert "vsteer: steering vLLM's vllm.v1.worker.cpu.model_runner.CPUModelRunner (Model Runner V2)" in (
        tmp_path / "server.log").read_text()


def test_vsteer_generate_runs_on_model_runner_v2(eager_llm, directions, tmp_path):
    """``vsteer generate`` on V2: steered, scheduled, gated and plain rows give V1's tokens, and its
    log says which runner it steered."""
    import re

    from vllm import SamplingParams

    love = directions["love"].sha256
    rows = [{"prompt": "I think that", "steering": None},
            {"prompt": "I think that", "steering": {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 8.0}]}},
            {"prompt": "My neighbour is", "steering": {"interventions": [
                {"op": "add", "vector": love, "layers": [6], "scale": 6.0, "schedule": {"kind": "exp", "half_life": 3}}]}},
            {"prompt": "I think that", "steering": {"interventions": [
                {"op": "add", "vector": love, "layers": [10], "scale": 8.0,
                 "when": {"vector": love, "layer": 12, "threshold": -1.0, "compare": "above"}}]}}]
    rows = [{**r, "max_tokens": 6, "temperature": 0.0} for r in rows]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**subprocess_env(), **harness_env(v2=True), "VSTEER_VECTOR_STORE": str(eager_llm.store.root)}
    env.pop("VSTEER_LOG", None)  # quiet: the log goes to the file the command names
    proc = subprocess.run([sys.executable, "-m", "vsteer.cli", "generate", "--input", str(src), "--output", str(dst),
                           "--eager", "--dtype", "float32", "--max-slots", "4"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line)["token_ids"] for line in dst.read_text().splitlines()]
    want = eager_llm.generate([r["prompt"] for r in rows], SamplingParams(max_tokens=6, temperature=0.0),
                              steering=[r["steering"] for r in rows])
    assert got == [list(o.outputs[0].token_ids) for o in want]
    assert got[1] != got[0]
    log = Path(re.search(r"vsteer: logs in (\S+)", proc.stderr).group(1)).read_text()
    assert "(Model Runner V2)" in log
