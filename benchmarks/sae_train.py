"""Train the default model's SAE (layer 15, width 4096) on CPU with nothing downloaded, and grade it.

Pipeline (:func:`vsteer.sae.train.train_model_sae`): the embedded SmolLM2 samples continuations of
the prompts shipped in ``vsteer/sae/data/prompts.txt`` (90% of them; temperature 1, top-p 0.95),
vsteer captures the residual at the output of layer ``--layer`` inside vLLM over prompt +
continuation (first token dropped: the attention sink), the trainer fits the SAE, and the held-out
10% of prompts (continuations sampled with another seed) give the evaluation: L0, fraction of
variance explained, dead features, and the LM loss of the model on those held-out texts, clean vs
with the SAE's reconstruction spliced in at the layer vs with the layer's output zeroed
(transformers, float32, positions >= 1).

The SAE is stored in the default SAE store (``$VSTEER_SAE_STORE`` or ``<cache>/saes``) as
``--name`` (default ``smollm2-l15-4k``), replacing an earlier one.

Run:  python benchmarks/sae_train.py    (TopK k=32; writes results/sae-train-topk.json and a RESULTS.md section)
      python benchmarks/sae_train.py --activation relu --name smollm2-l15-4k-relu --work-dir W --resume
      (ReLU + L1 on the activations a first run with --work-dir W collected)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, publish

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=300_000, help="training activations to collect")
    ap.add_argument("--activation", choices=["topk", "relu"], default="topk")
    ap.add_argument("--k", type=int, default=None, help="TopK k (default 32)")
    ap.add_argument("--l1", type=float, default=2.0, help="ReLU only")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--gen-tokens", type=int, default=192)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--eval-texts", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", help="engine dtype (generation and capture); the model is stored in bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="smollm2-l15-4k")
    ap.add_argument("--work-dir", type=Path, default=None, help="activations + checkpoints (default: a temporary folder)")
    ap.add_argument("--resume", action="store_true", help="keep what --work-dir holds (times then cover only the rest)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--no-publish", action="store_true", help="print only: no JSON, no RESULTS.md section")
    args = ap.parse_args()
    os.environ.update(OMP_NUM_THREADS=str(args.threads), VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                      VLLM_NO_USAGE_STATS="1")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp())
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)

    import torch
    import vllm

    from vsteer.cli.sae import eval_table
    from vsteer.engine.llm import LLM
    from vsteer.models import prepare_default_model
    from vsteer.sae.store import SaeStore
    from vsteer.sae.train import train_model_sae

    torch.set_num_threads(args.threads)
    k = (args.k or 32) if args.activation == "topk" else None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vsteer-sae-bench-"))
    started = time.perf_counter()
    llm = LLM(str(prepare_default_model()), enforce_eager=True, dtype=args.dtype, max_model_len=512, max_num_seqs=64,
              kv_cache_memory_bytes=2 * 2**30, capture_layers=[args.layer])
    engine_s = time.perf_counter() - started
    sae, report = train_model_sae(
        llm, args.layer, width=args.width, tokens=args.tokens, work_dir=work, activation=args.activation, k=k,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, l1_coefficient=args.l1, seed=args.seed,
        gen_tokens=args.gen_tokens, eval_tokens=args.eval_tokens, eval_texts=args.eval_texts, name=args.name,
        resume=args.resume,
    )
    path = SaeStore().add(args.name, sae, overwrite=True)
    total_s = time.perf_counter() - started
    for metric, value in eval_table(report):
        print(f"{metric:40s} {value}")
    print(f"stored {args.name!r} in {path}; total {total_s:.0f} s")

    ev, lm, tr = report["eval"], report["lm"], report["train"]
    sparsity = f"TopK k={k}" if k else f"L1 coefficient {args.l1}"
    machine = (f"{cpu_description()} ({args.threads} threads), torch {torch.__version__}, "
               f"vLLM {vllm.__version__}, {args.dtype} engine, eager")
    lines = [
        (f"SmolLM2-135M-Instruct, layer {args.layer} (resid_post), width {args.width}, {args.activation} ({sparsity}). "
        f"Training text: the model's own continuations (temperature 1, no truncation, up to {args.gen_tokens} tokens) of "
        f"the 90% of `vsteer/sae/data/prompts.txt` not held out, chat template for 3/4 of them, raw text otherwise; "
        f"{report['train_tokens']:,} activations captured inside vLLM (first token dropped, duplicate prompt tokens skipped). "
        f"{tr['steps']} Adam steps x {args.batch_size} tokens (lr {args.lr}). Evaluation: {ev['tokens']:,} activations and "
        f"{lm['tokens']:,} next-token predictions from continuations of the held-out 10% of prompts (another seed); "
        "the LM loss runs transformers in float32 with the SAE's reconstruction (or zeros) in place of the layer's output "
        "at every position but the first. Stored as "
        f"`{args.name}` in the default SAE store."), "",
        "| metric | value |", "|---|---:|",
    ]
    lines += [f"| {m} | {v} |" for m, v in eval_table(report)]
    lines += ["", (f"Wall time: engine start {engine_s:.0f} s, collecting activations {report['collect_seconds']:.0f} s "
              f"(generation + capture, train and held-out), training {report['train_seconds']:.0f} s, evaluation "
              f"{report['eval_seconds']:.0f} s; total {total_s:.0f} s."
              + (" With --resume: activations already in --work-dir were reused, so the collection time covers only"
                 " what was missing." if args.resume else ""))]
    if args.no_publish:
        return
    publish(f"## SAE training (CPU, {args.activation})", args.out_dir / f"sae-train-{args.activation}.json",
            {"settings": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()}, "report": report,
             "engine_seconds": round(engine_s, 1), "total_seconds": round(total_s, 1), "sae_sha256": sae.sha256()},
            lines, machine=machine)


if __name__ == "__main__":
    main()
