"""Residual-stream activations for SAE training, captured inside vLLM from text made offline.

Nothing is downloaded: the text is the model's own sampled continuations of a diverse prompt set
shipped with vsteer (``vsteer/sae/data/prompts.txt``, ~500 short prompts: questions, instructions,
stories, code, lists, dialogue, role-play, raw text openings). :func:`collect_activations`

1. walks an endless, seeded stream of items ``(pass, prompt)``: pass ``p`` visits every prompt
   once, in a shuffled order of its own;
2. formats each item with the chat template (the default, ``chat_fraction=0.75`` of items) or as
   raw text (the rest), chosen per item by a hash of the seed, so the SAE sees both conversations
   (how the instruct model is served and steered) and plain running text;
3. samples a continuation with vLLM at ``temperature=1`` without truncation (the model's own
   distribution; a per-item seed derived from ``seed``, so the same items get the same text
   whatever the batch split, or however a prompt's prefill is chunked: vsteer's runner undoes a
   discarded chunk's draw, tests/engine/test_exactness.py);
4. captures the residual at the output of decoder layer ``layer`` over prompt + continuation with
   one ``llm.capture`` call (one prefill pass, unsteered); a sequence whose prefill is chunked
   across steps captures the same rows as alone (tests/engine/test_exactness.py);
5. keeps the token positions below and writes one shard per ``batch`` items.

Which positions are kept:

- position 0 never: the first token is the attention sink, whose residual norm is ~100x every
  other token's (SmolLM2 layer 15: ~25,000 vs ~160). Kept, it would dominate the reconstruction
  loss and the input normalisation; the trained SAE is meant for positions >= 1 (the LM-loss
  evaluation in :mod:`vsteer.sae.train` splices it there only, too);
- duplicate activations never: the model is causal, so a prompt's tokens have the same
  activations every time the same formatted prompt is read. A prompt's own tokens are kept only
  on its first visit in a format; later visits keep the continuation only. The chat template's
  system block (the same ~20 tokens in every chat item) is kept once per shard.

Shards (``<out_path>/shard-000000.safetensors``...) hold ``activations`` (float32 ``[n, d]``),
the sequences' ``token_ids`` (concatenated, int32), ``seq_offsets`` and ``starts`` (the first kept
position of each sequence): the text itself, so evaluations can reuse it. ``meta.json`` records
the settings; a rerun with the same settings keeps the shards on disk and collects only the rest
(resumable; a larger ``num_tokens`` extends a finished collection).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "collect_activations",
    "load_activations",
    "load_prompts",
    "load_sequences",
    "split_prompts",
]

META_FILE = "meta.json"
META_VERSION = 1
TEMPERATURE = 1.0


def load_prompts(path: str | os.PathLike[str] | None = None) -> list[str]:
    """The prompt set: one prompt a line (blank lines skipped); default the one shipped in vsteer."""
    if path is None:
        text = resources.files("vsteer.sae").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_prompts(prompts: Sequence[str], holdout: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split prompts into (train, held-out) by a hash of (seed, text): stable under reordering."""
    train, held = [], []
    for p in prompts:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:8], "little") / 2**64
        (held if h < holdout else train).append(p)
    return train, held


class _Item(NamedTuple):
    pass_index: int
    prompt_index: int
    chat: bool
    keep_prompt: bool  # first visit of this prompt in this format
    seed: int


def _hash_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def _use_chat(seed: int, pass_index: int, prompt_index: int, chat_fraction: float) -> bool:
    return _hash_int(seed, "fmt", pass_index, prompt_index) / 2**64 < chat_fraction


def _items(n_prompts: int, seed: int, chat_fraction: float) -> Iterator[_Item]:
    """The endless item stream: pass p visits every prompt once in its own shuffled order."""
    p = 0
    while True:
        order = list(range(n_prompts))
        random.Random(f"{seed}:order:{p}").shuffle(order)
        for i in order:
            chat = _use_chat(seed, p, i, chat_fraction)
            first = all(_use_chat(seed, q, i, chat_fraction) != chat for q in range(p))
            yield _Item(p, i, chat, first, _hash_int(seed, "sample", p, i) & (2**31 - 1))
        p += 1


def _system_prefix_len(tokenizer: Any) -> int:
    """Length of the token prefix every chat-formatted prompt shares (the system block)."""
    a, b = (_chat_ids(tokenizer, t) for t in ("Hello there.", "What is two plus two?"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _raw_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:06d}.safetensors"


def _done_shards(out: Path) -> list[Path]:
    """Shards 0, 1, ... present on disk (stops at the first gap)."""
    shards = []
    while _shard_path(out, len(shards)).is_file():
        shards.append(_shard_path(out, len(shards)))
    return shards


def _shard_tokens(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(f.get_slice("activations").get_shape()[0])


def _engine_dtype(llm: Any) -> str | None:
    try:
        return str(llm.engine.llm_engine.model_config.dtype).removeprefix("torch.")
    except AttributeError:
        return None


def collect_activations(
    llm: Any,
    layer: int,
    *,
    prompts: Sequence[str] | None = None,
    num_tokens: int,
    gen_tokens: int = 192,
    seed: int = 0,
    out_path: str | os.PathLike[str],
    batch: int = 64,
    chat_fraction: float = 0.75,
    progress: bool = True,
) -> torch.Tensor:
    """Collect ``num_tokens`` residual-stream activations at the output of ``layer``.

    Args:
        llm: a ``vsteer.LLM`` whose capture layers include ``layer``.
        layer: 0-based decoder layer (hook ``resid_post``).
        prompts: prompt texts (default :func:`load_prompts`).
        num_tokens: activations to collect (the last shard is trimmed in the result).
        gen_tokens: new tokens sampled per item (fewer where ``max_model_len`` is short).
        seed: seeds the prompt order, the chat/raw choice and every sample.
        out_path: shard folder; shards already there (same settings) are kept.
        batch: items per ``generate`` + ``capture`` call, and per shard.
        chat_fraction: share of items formatted with the chat template (the rest: raw text).
        progress: show a tqdm bar (tokens).

    Returns:
        float32 ``[num_tokens, hidden]`` (shard order, not shuffled).

    Raises:
        ValueError: ``out_path`` holds shards collected with other settings.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm
    from vllm import SamplingParams

    if num_tokens <= 0 or batch <= 0 or gen_tokens <= 0:
        raise ValueError("num_tokens, batch and gen_tokens must be positive")
    prompts = list(load_prompts() if prompts is None else prompts)
    if not prompts:
        raise ValueError("no prompts")
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    shape = llm.model_shape
    meta = {
        "version": META_VERSION, "model": shape.name, "hidden": shape.hidden_size, "layer": int(layer),
        "hook": "resid_post", "seed": seed, "gen_tokens": gen_tokens, "batch": batch, "chat_fraction": chat_fraction,
        "temperature": TEMPERATURE, "dtype": _engine_dtype(llm), "max_model_len": int(llm.max_model_len),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "skip": "first token; duplicate prompt tokens",
    }
    meta_path = out / META_FILE
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(f"{out} holds activations collected with other settings ({', '.join(diff)}); use another folder")
    else:
        meta_path.write_text(json.dumps(meta, indent=2))

    shards = _done_shards(out)
    have = sum(_shard_tokens(s) for s in shards)
    tokenizer = llm.get_tokenizer()
    sys_len = _system_prefix_len(tokenizer)
    max_len = int(llm.max_model_len)
    stream = _items(len(prompts), seed, chat_fraction)
    for _ in range(len(shards) * batch):  # skip the items of the shards on disk
        next(stream)
    bar = tqdm(total=num_tokens, initial=min(have, num_tokens), unit="tok", desc=f"activations L{layer}",
               disable=not progress, dynamic_ncols=True)
    try:
        while have < num_tokens:
            items = [next(stream) for _ in range(batch)]
            ids, params = [], []
            for item in items:
                text = prompts[item.prompt_index]
                p_ids = (_chat_ids if item.chat else _raw_ids)(tokenizer, text)[: max_len // 2]
                ids.append(p_ids)
                params.append(SamplingParams(max_tokens=max(1, min(gen_tokens, max_len - len(p_ids) - 1)),
                                             temperature=TEMPERATURE, seed=item.seed))
            outs = llm.generate(ids, params)
            seqs = [list(p) + list(o.outputs[0].token_ids) for p, o in zip(ids, outs)]
            seqs = [s[: max_len - 1] for s in seqs]
            starts, seen_system = [], False
            for item, p_ids, seq in zip(items, ids, seqs):
                if not item.keep_prompt:
                    start = len(p_ids)
                elif item.chat:
                    start = 1 if not seen_system else sys_len
                    seen_system = True
                else:
                    start = 1
                starts.append(min(max(start, 1), len(seq)))
            caps = llm.capture(seqs, [layer])
            acts = torch.cat([c[layer][s:] for c, s in zip(caps, starts)]).float().contiguous()
            lengths = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.int64)
            tensors = {
                "activations": acts,
                "token_ids": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
                "seq_offsets": torch.cumsum(lengths, 0),
                "starts": torch.tensor(starts, dtype=torch.int64),
            }
            path = _shard_path(out, len(shards))
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"layer": str(layer), "items": str(len(items))})
            os.replace(tmp, path)
            shards.append(path)
            have += acts.shape[0]
            bar.update(min(acts.shape[0], max(num_tokens - bar.n, 0)))
    finally:
        bar.close()
    return load_activations(out, num_tokens)


def load_activations(out_path: str | os.PathLike[str], num_tokens: int | None = None) -> torch.Tensor:
    """The activations of a shard folder, float32 ``[n, hidden]`` (the first ``num_tokens``)."""
    from safetensors import safe_open

    shards = _done_shards(Path(out_path))
    if not shards:
        raise FileNotFoundError(f"no activation shards in {out_path}")
    sizes = [_shard_tokens(s) for s in shards]
    total = sum(sizes) if num_tokens is None else min(num_tokens, sum(sizes))
    with safe_open(str(shards[0]), "pt") as f:
        hidden = f.get_slice("activations").get_shape()[1]
    out = torch.empty(total, hidden, dtype=torch.float32)
    at = 0
    for path, n in zip(shards, sizes):
        if at >= total:
            break
        take = min(n, total - at)
        with safe_open(str(path), "pt") as f:
            out[at: at + take] = f.get_slice("activations")[:take]
        at += take
    return out


def load_sequences(out_path: str | os.PathLike[str]) -> list[list[int]]:
    """The token ids of every sequence (prompt + continuation) in a shard folder, in order."""
    from safetensors.torch import load_file

    seqs: list[list[int]] = []
    for path in _done_shards(Path(out_path)):
        t = load_file(str(path))
        ids, off = t["token_ids"].tolist(), t["seq_offsets"].tolist()
        seqs += [ids[a:b] for a, b in itertools.pairwise(off)]
    return seqs
