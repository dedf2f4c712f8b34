"""A small SAE trainer for CPU, and the numbers that say whether an SAE is any good.

:func:`train_sae` trains a :class:`~vsteer.sae.model.SparseAutoencoder` on residual-stream
activations (``[n_tokens, d_in]``, e.g. from :func:`vsteer.sae.activations.collect_activations`):

- **ReLU** (default), the Anthropic April-2024 recipe: ``loss = ||x - x_hat||^2 + l1 * sum_i
  f_i ||W_dec_i||`` (squared error summed over dimensions, averaged over tokens; the penalty
  weighted by decoder-row norms, so shrinking the features cannot cheat it). ``l1`` warms up
  linearly over the first ``l1_warmup`` of the steps (default 20%, not Anthropic's 5%: with the
  few hundred steps a CPU run affords, a fast warm-up kills many features).
- **TopK** (``config.activation == "topk"``, k from the config): ``loss = ||x - x_hat||^2 +
  aux_k_coefficient * AuxK`` (Gao et al. 2024): no L1; decoder rows are kept at unit norm; the
  AuxK term lets features dead for ``dead_tokens`` tokens reconstruct the residual error.

Init: decoder rows are random directions (norm 0.1 for ReLU, 1 for TopK), ``W_enc = W_dec^T``,
``b_enc = 0``, ``b_dec`` = the (normalised) data mean. Adam (0.9, 0.999), gradient norm clipped
to 1, the learning rate warmed up linearly over ``lr_warmup`` of the steps and decayed linearly
to 0 over the last ``lr_decay``. Batches are drawn epoch by epoch from seeded permutations, so a
run is fully determined by its arguments (and the thread count).

**Input normalisation.** Training sees ``x * s`` with one scalar ``s = sqrt(d_in / E||x||^2)``
(mean squared norm = ``d_in``), which makes ``l1``, ``lr`` and the init transferable between
models and layers. When training ends, ``s`` is folded into the weights (``W_enc *= s``,
``W_dec /= s``, ``b_dec /= s``), and each decoder row's norm is moved into its encoder column and
bias (``f_i`` scaled by ``||W_dec_i||``, row made unit norm; ReLU and TopK are positively
homogeneous, and TopK rows all share one norm so the top-k choice is unchanged). The returned SAE
therefore reads RAW activations, its decoder rows are unit directions (what feature steering
adds), and ``provenance["norm_scale"]`` records ``s``.

**Resume.** Every ``checkpoint_every`` steps (and on Ctrl-C, and at the end) the model, the Adam
state, the step, the RNG state and the running statistics go to
``<checkpoint_dir>/checkpoint.pt`` (written atomically). A call with the same arguments and data
continues from there and ends with the same weights as an uninterrupted run.

:func:`evaluate_sae` reports L0, the fraction of variance unexplained and dead features;
:func:`spliced_lm_loss` the LM loss with the SAE's reconstruction spliced into the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vsteer.sae.model import SaeConfig, SparseAutoencoder

__all__ = ["TrainStats", "evaluate_sae", "spliced_lm_loss", "train_sae"]

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1


@dataclass
class TrainStats:
    """What a training run did. ``loss``/``mse``/``l0``/``fvu`` are running means (EMA) over the
    last ~10 training batches, in normalised units for ``loss`` and ``mse``."""

    steps: int
    tokens: int
    seconds: float  # wall time of this call (a resumed call counts only its own steps)
    resumed_from: int  # 0 when started fresh
    norm_scale: float
    loss: float
    mse: float
    l0: float
    fvu: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ train


def norm_scale(activations: torch.Tensor) -> float:
    """``s`` such that ``x * s`` has mean squared norm ``d_in``."""
    sq = activations.double().pow(2).sum() / activations.shape[0]
    return float(math.sqrt(activations.shape[1] / float(sq)))


def _fingerprint(x: torch.Tensor) -> str:
    """A cheap content hash of the training data (shape + a strided sample)."""
    idx = torch.linspace(0, x.shape[0] - 1, steps=min(x.shape[0], 4096)).long()
    return hashlib.sha256(repr(tuple(x.shape)).encode() + x[idx].double().sum(1).numpy().tobytes()).hexdigest()[:16]


def _init(sae: SparseAutoencoder, data_mean: torch.Tensor, gen: torch.Generator) -> None:
    m, d = sae.d_sae, sae.d_in
    with torch.no_grad():
        w = torch.randn(m, d, generator=gen, dtype=torch.float64)
        w = w / w.norm(dim=1, keepdim=True) * (1.0 if sae.activation == "topk" else 0.1)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(data_mean)


def _lr_factor(step: int, steps: int, warmup: float, decay: float) -> float:
    w = max(1, int(warmup * steps))
    d = int(decay * steps)
    if step < w:
        return (step + 1) / w
    if d and step >= steps - d:
        return max(0.0, (steps - step) / d)
    return 1.0


def _batch_indices(step: int, n: int, batch_size: int, seed: int, cache: dict) -> torch.Tensor:
    per_epoch = max(1, n // batch_size)
    epoch, j = divmod(step, per_epoch)
    if cache.get("epoch") != epoch:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        cache["epoch"], cache["perm"] = epoch, torch.randperm(n, generator=g)
    start = j * batch_size
    return cache["perm"][start: start + batch_size]


def _aux_k_loss(sae: SparseAutoencoder, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK: the top ``k_aux`` dead features' reconstruction of the (detached) residual error."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    masked = torch.where(dead, torch.relu(pre), torch.zeros_like(pre))
    top = torch.topk(masked, min(k_aux, n_dead), dim=-1)
    err_hat = torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ sae.W_dec
    return (err_hat - err.detach()).pow(2).sum(-1).mean()


def train_sae(
    activations: torch.Tensor,
    config: SaeConfig,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 4096,
    lr: float = 2e-3,
    l1_coefficient: float = 2.0,
    l1_warmup: float = 0.2,
    lr_warmup: float = 0.02,
    lr_decay: float = 0.2,
    aux_k_coefficient: float = 1 / 32,
    dead_tokens: int = 200_000,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 200,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = True,
) -> tuple[SparseAutoencoder, TrainStats]:
    """Train an SAE on ``activations`` (float ``[n_tokens, config.d_in]``, raw units).

    Args:
        config: what to train (``d_in``, ``d_sae``, ``activation`` relu|topk, ``k``, ``layer``...).
        steps: optimizer steps; default ``epochs`` passes over the data (default 1 epoch).
        batch_size: tokens per step.
        lr: Adam learning rate (peak).
        l1_coefficient: ReLU sparsity penalty (ignored for TopK).
        l1_warmup / lr_warmup / lr_decay: fractions of ``steps``.
        aux_k_coefficient / dead_tokens: TopK AuxK weight, and how long unfired means dead.
        seed: init and batch order.
        checkpoint_dir: where checkpoints go (None: no checkpoints, no resume).
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint_dir`` if a checkpoint of the same run is there.
        stop_at: stop after this step (checkpointed), as an interruption would; a later call resumes.
        progress: tqdm bar with loss, L0 and FVU.

    Returns:
        ``(sae, stats)``: the SAE (reads raw activations; see the module docstring) and a summary.

    Raises:
        ValueError: bad arguments, or a checkpoint of a different run in ``checkpoint_dir``.
    """
    from tqdm import tqdm

    if activations.ndim != 2 or activations.shape[1] != config.d_in:
        raise ValueError(f"activations must be [n, {config.d_in}], got {tuple(activations.shape)}")
    if config.activation not in ("relu", "topk"):
        raise ValueError(f"train_sae trains relu and topk SAEs, not {config.activation}")
    x_all = activations.float()
    n = x_all.shape[0]
    batch_size = min(batch_size, n)
    if steps is None:
        steps = max(1, int((epochs if epochs is not None else 1.0) * n / batch_size))
    topk = config.activation == "topk"
    settings = {
        "version": CHECKPOINT_VERSION, "config": config.to_json(), "steps": steps, "batch_size": batch_size, "lr": lr,
        "l1_coefficient": l1_coefficient, "l1_warmup": l1_warmup, "lr_warmup": lr_warmup, "lr_decay": lr_decay,
        "aux_k_coefficient": aux_k_coefficient, "dead_tokens": dead_tokens, "seed": seed, "data": _fingerprint(x_all),
    }
    scale = norm_scale(x_all)
    sae = SparseAutoencoder(config)
    gen = torch.Generator().manual_seed(seed)
    _init(sae, (x_all.double().mean(0) * scale).float(), gen)
    optim = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(config.d_sae, dtype=torch.int64)
    ema: dict[str, float] = {}
    history: list[dict[str, float]] = []
    start = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt_path is not None and resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["settings"] != settings:
            diff = sorted(k for k in settings if ckpt["settings"].get(k) != settings[k])
            raise ValueError(f"{ckpt_path} is a checkpoint of another run (differs in {diff}); "
                             "pass resume=False or use another checkpoint_dir")
        sae.load_state_dict(ckpt["sae"])
        optim.load_state_dict(ckpt["optim"])
        since_fired, ema, history, start = ckpt["since_fired"], ckpt["ema"], ckpt["history"], ckpt["step"]
        torch.set_rng_state(ckpt["rng"])

    def save(step: int) -> None:
        if ckpt_path is None:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"settings": settings, "step": step, "sae": sae.state_dict(), "optim": optim.state_dict(),
                    "since_fired": since_fired, "ema": ema, "history": history, "rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, ckpt_path)

    end = steps if stop_at is None else min(steps, stop_at)
    perm_cache: dict = {}
    k_aux = max(1, config.d_in // 2)
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, unit="step", desc=f"SAE {config.d_sae}", disable=not progress, dynamic_ncols=True)
    step = start
    between_steps = True  # the weights match ``step`` (a Ctrl-C in mid-step must not be saved)
    try:
        while step < end:
            x = x_all[_batch_indices(step, n, batch_size, seed, perm_cache)] * scale
            for group in optim.param_groups:
                group["lr"] = lr * _lr_factor(step, steps, lr_warmup, lr_decay)
            pre = sae.pre_activation(x)
            if topk:  # sparse decode: only the k chosen rows of W_dec (same result as sae.decode)
                top = torch.topk(pre, config.k, dim=-1)  # type: ignore[arg-type]
                vals = torch.relu(top.values)
                x_hat = torch.nn.functional.embedding_bag(top.indices, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
                active = top.indices[vals > 0]
                l0 = float((vals > 0).sum()) / x.shape[0]
            else:
                f = sae.activate(pre)
                x_hat = sae.decode(f)
                active = (f > 0).any(0).nonzero().squeeze(1)
                l0 = float((f > 0).sum()) / x.shape[0]
            err = x - x_hat
            mse = err.pow(2).sum(-1).mean()
            if topk:
                dead = since_fired > dead_tokens
                aux = _aux_k_loss(sae, pre, err, dead, k_aux)
                loss = mse + aux_k_coefficient * aux
            else:
                l1 = l1_coefficient * min(1.0, (step + 1) / max(1, int(l1_warmup * steps)))
                loss = mse + l1 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if topk:  # keep unit-norm rows: drop the gradient along each row
                with torch.no_grad():
                    sae.W_dec.grad -= (sae.W_dec.grad * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            between_steps = False
            optim.step()
            with torch.no_grad():
                if topk:
                    sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
                since_fired += x.shape[0]
                since_fired[active] = 0
                var = (x - x.mean(0)).pow(2).sum()
                now = {"loss": float(loss), "mse": float(mse), "l0": l0, "fvu": float(err.pow(2).sum() / var)}
            for key, v in now.items():
                ema[key] = v if key not in ema else 0.9 * ema[key] + 0.1 * v
            step += 1
            between_steps = True
            if step % 10 == 0 or step == end:
                bar.set_postfix(loss=f"{ema['loss']:.1f}", L0=f"{ema['l0']:.1f}", FVU=f"{ema['fvu']:.3f}", refresh=False)
            if step % max(1, steps // 50) == 0 or step == steps:
                history.append({"step": step, **{k: round(v, 5) for k, v in ema.items()},
                                "dead": int((since_fired > dead_tokens).sum())})
            bar.update(1)
            if step % checkpoint_every == 0 and step < end:
                save(step)
    except KeyboardInterrupt:
        if between_steps:
            save(step)
        raise
    finally:
        bar.close()
    save(step)
    stats = TrainStats(steps=step, tokens=step * batch_size, seconds=round(time.perf_counter() - t0, 2), resumed_from=start,
                       norm_scale=scale, loss=ema.get("loss", float("nan")), mse=ema.get("mse", float("nan")),
                       l0=ema.get("l0", float("nan")), fvu=ema.get("fvu", float("nan")), history=history)
    provenance = {**config.provenance, "trainer": "vsteer.sae.train", "norm_scale": scale, "steps": step,
                  "tokens_seen": step * batch_size, "train_tokens": n, "batch_size": batch_size, "lr": lr, "seed": seed,
                  **({} if topk else {"l1_coefficient": l1_coefficient})}
    return fold(sae, scale, provenance=provenance), stats


def fold(sae: SparseAutoencoder, scale: float, *, provenance: dict[str, Any] | None = None) -> SparseAutoencoder:
    """An SAE trained on ``x * scale``, rewritten to read raw ``x``, with unit-norm decoder rows
    (each row's norm moved into its feature's encoder column and bias). Same ``f`` up to the
    per-feature rescale, same reconstruction."""
    config = dataclasses.replace(sae.config, provenance=dict(provenance if provenance is not None else sae.config.provenance))
    out = SparseAutoencoder(config)
    with torch.no_grad():
        w_dec = sae.W_dec.double() / scale
        norms = w_dec.norm(dim=1).clamp_min(1e-12)
        out.W_dec.copy_(w_dec / norms[:, None])
        out.W_enc.copy_(sae.W_enc.double() * scale * norms[None, :])
        out.b_enc.copy_(sae.b_enc.double() * norms)
        out.b_dec.copy_(sae.b_dec.double() / scale)
        out.threshold.copy_(sae.threshold.double() * norms)
    return out


# ------------------------------------------------------------------------------------------ evaluate


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, activations: torch.Tensor, *, batch_size: int = 8192) -> dict[str, float]:
    """Reconstruction quality on ``activations`` (raw ``[n, d_in]``).

    Returns:
        ``tokens``; ``l0`` (mean active features per token); ``fvu`` = sum ||x - x_hat||^2 /
        sum ||x - mean(x)||^2 and ``variance_explained`` = 1 - fvu; ``mse`` (mean squared error
        per token, summed over dimensions); ``cosine`` (mean cos(x, x_hat)); ``dead_features``
        (never active on these tokens) and ``dead_fraction``.
    """
    x_all = activations
    n = x_all.shape[0]
    mean = x_all.double().mean(0)
    sq_err = var = l0 = cos = 0.0
    ever = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in range(0, n, batch_size):
        x = x_all[i: i + batch_size].float()
        f = sae.encode(x)
        x_hat = sae.decode(f)
        sq_err += float((x - x_hat).double().pow(2).sum())
        var += float((x.double() - mean).pow(2).sum())
        l0 += float((f > 0).sum())
        cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).double().sum())
        ever |= (f > 0).any(0)
    fvu = sq_err / var if var > 0 else float("nan")
    dead = int((~ever).sum())
    return {"tokens": n, "l0": l0 / n, "fvu": fvu, "variance_explained": 1 - fvu, "mse": sq_err / n, "cosine": cos / n,
            "dead_features": dead, "dead_fraction": dead / sae.d_sae}


def _hf_model(model: Any) -> Any:
    """An HF causal LM from a model, a vsteer.LLM (its folder) or a folder path."""
    if isinstance(model, torch.nn.Module):
        return model
    path = getattr(model, "model_path", model)
    from transformers import AutoModelForCausalLM

    from vsteer.models import resolve_model

    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model(str(path))), dtype=torch.float32)
    hf.eval()
    return hf


@torch.no_grad()
def spliced_lm_loss(
    llm_or_hf: Any,
    sae: SparseAutoencoder,
    texts: Sequence[str] | Sequence[Sequence[int]],
    *,
    layer: int | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[str, float]:
    """LM cross-entropy with the SAE's reconstruction spliced in at ``layer`` vs without.

    Runs a transformers model (an evaluation utility, not the serving path): ``llm_or_hf`` is an
    HF causal LM, a ``vsteer.LLM`` (its model folder is loaded in float32) or a model folder /
    alias. A forward hook on decoder layer ``layer`` (default ``sae.layer``) replaces its output
    by ``sae(output)`` ("spliced") or by zeros ("zero-ablated") at every position except the
    first, which the SAE was not trained on (the attention sink, see
    :mod:`vsteer.sae.activations`). The loss is averaged over the next-token predictions made at
    positions >= 1 (the ones the splice can change).

    Args:
        texts: strings (tokenized without special tokens) or token-id lists.

    Returns:
        ``clean_loss``, ``spliced_loss``, ``zero_ablation_loss``, ``delta_loss`` (spliced -
        clean), ``loss_recovered`` = (zero - spliced) / (zero - clean), and ``tokens``.
    """
    layer = sae.layer if layer is None else layer
    if layer is None:
        raise ValueError("the SAE does not say its layer; pass layer=")
    hf = _hf_model(llm_or_hf)
    device = next(hf.parameters()).device
    if texts and isinstance(texts[0], str):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf.config._name_or_path)
        seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # type: ignore[arg-type]
    else:
        seqs = [list(s) for s in texts]
    seqs = [s[:max_length] for s in seqs if len(s) >= 3]
    if not seqs:
        raise ValueError("no text with at least 3 tokens")
    sae_dev = sae.to(device) if next(sae.parameters()).device != device else sae
    mode = {"m": "clean"}

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        if mode["m"] == "clean":
            return output
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        if mode["m"] == "spliced":
            h[:, 1:] = sae_dev(h[:, 1:].float()).to(h.dtype)
        else:
            h[:, 1:] = 0
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = hf.model.layers[layer].register_forward_hook(hook)
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    try:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for b in range(0, len(order), batch_size):
            group = [seqs[i] for i in order[b: b + batch_size]]
            width = max(len(s) for s in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for r, s in enumerate(group):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            # predictions at positions 1..len-2 of targets 2..len-1
            targets = ids[:, 2:]
            valid = mask[:, 2:].bool()
            for m in totals:
                mode["m"] = m
                logits = hf(input_ids=ids, attention_mask=mask).logits[:, 1:-1].float()
                ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
                totals[m] += float(ce[valid.reshape(-1)].double().sum())
            count += int(valid.sum())
    finally:
        handle.remove()
    clean, spliced, zero = (totals[k] / count for k in ("clean", "spliced", "zero"))
    return {"clean_loss": clean, "spliced_loss": spliced, "zero_ablation_loss": zero, "delta_loss": spliced - clean,
            "loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"), "tokens": count}


# ------------------------------------------------------------------------------------------ pipeline


def train_model_sae(
    llm: Any,
    layer: int,
    *,
    width: int,
    tokens: int,
    work_dir: str | os.PathLike[str],
    activation: str = "topk",
    k: int | None = None,
    steps: int | None = None,
    epochs: float = 8.0,
    batch_size: int = 4096,
    lr: float = 2e-3,
    l1_coefficient: float = 2.0,
    seed: int = 0,
    gen_tokens: int = 192,
    collect_batch: int = 64,
    eval_tokens: int = 20_000,
    eval_texts: int = 64,
    name: str | None = None,
    resume: bool = True,
    progress: bool = True,
    hf_model: Any = None,
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Collect, train, evaluate: an SAE for ``llm``'s model at ``layer``, nothing downloaded.

    Train activations come from the shipped prompts minus a held-out 10%
    (:func:`~vsteer.sae.activations.split_prompts`); the evaluation (:func:`evaluate_sae` and
    :func:`spliced_lm_loss`) uses the model's continuations of the held-out prompts (another
    seed), run through ``hf_model`` (an HF model of the same weights; default: loaded from the
    model folder). ``work_dir`` keeps ``train-acts/``, ``eval-acts/`` and ``checkpoints/<key of
    the SAE config and training settings>/``, so a rerun with the same arguments resumes, and
    another SAE can be trained on the same activations; ``resume=False`` deletes them first.

    ``activation`` is ``"topk"`` (default, ``k`` default 32) or ``"relu"`` (``l1_coefficient``).

    Returns:
        ``(sae, report)``; ``report`` has ``train`` (:class:`TrainStats` as a dict), ``eval``,
        ``lm`` and the wall times ``collect_seconds``, ``train_seconds``, ``eval_seconds``.
    """
    import shutil

    from vsteer.sae.activations import (
        collect_activations,
        load_prompts,
        load_sequences,
        split_prompts,
    )

    if activation == "topk" and k is None:
        k = 32
    work = Path(work_dir)
    parts = {p: work / p for p in ("train-acts", "eval-acts", "checkpoints")}
    if not resume:
        for p in parts.values():
            shutil.rmtree(p, ignore_errors=True)
    train_prompts, held_prompts = split_prompts(load_prompts(), seed=seed)
    t0 = time.perf_counter()
    acts = collect_activations(llm, layer, prompts=train_prompts, num_tokens=tokens, gen_tokens=gen_tokens, seed=seed,
                               out_path=parts["train-acts"], batch=collect_batch, progress=progress)
    held = collect_activations(llm, layer, prompts=held_prompts, num_tokens=eval_tokens, gen_tokens=gen_tokens, seed=seed + 1,
                               out_path=parts["eval-acts"], batch=collect_batch, progress=progress)
    collect_s = time.perf_counter() - t0
    shape = llm.model_shape
    config = SaeConfig(d_in=shape.hidden_size, d_sae=width, activation=activation, k=k, layer=layer,  # type: ignore[arg-type]
                       model=shape.name, name=name,
                       provenance={"data": "own generations of vsteer/sae/data/prompts.txt", "train_tokens": tokens,
                                   "gen_tokens": gen_tokens, "data_seed": seed})
    t0 = time.perf_counter()
    hyper = {"steps": steps, "epochs": None if steps else epochs, "batch_size": batch_size, "lr": lr,
             "l1_coefficient": l1_coefficient, "seed": seed}
    run_key = hashlib.sha256(json.dumps([config.to_json(), hyper], sort_keys=True).encode()).hexdigest()[:12]
    sae, stats = train_sae(acts, config, **hyper, checkpoint_dir=parts["checkpoints"] / run_key,  # type: ignore[arg-type]
                           resume=resume, progress=progress)
    train_s = time.perf_counter() - t0
    del acts
    t0 = time.perf_counter()
    evaluation = evaluate_sae(sae, held)
    lm = spliced_lm_loss(llm if hf_model is None else hf_model, sae, load_sequences(parts["eval-acts"])[:eval_texts])
    eval_s = time.perf_counter() - t0
    report = {"train": stats.to_json(), "eval": evaluation, "lm": lm, "collect_seconds": round(collect_s, 1),
              "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1), "train_tokens": tokens,
              "eval_tokens": int(held.shape[0])}
    (work / "report.json").write_text(json.dumps(report, indent=2))
    return sae, report
