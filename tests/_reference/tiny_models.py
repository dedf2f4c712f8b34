"""Tiny randomly initialised HF model folders, built offline, that vLLM and transformers both load.

Every folder borrows the default model's tokenizer (SmolLM2, vocab 49152), so the models use that
vocabulary with tiny hidden sizes. Head size 32 is the smallest vLLM's CPU attention accepts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

VOCAB = 49152
HIDDEN = 64
LAYERS = 4
HEADS = 2  # head size 32
MAX_POS = 512
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _configs() -> dict:
    from transformers import (
        Gemma2Config,
        GPT2Config,
        OPTConfig,
        Qwen2Config,
        Qwen3Config,
        StableLmConfig,
    )

    ids = dict(bos_token_id=1, eos_token_id=2)
    llama_like = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=MAX_POS, **ids,
    )
    return {
        "gpt2": lambda: GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS, **ids
        ),
        "qwen2": lambda: Qwen2Config(**llama_like, tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**llama_like, head_dim=HIDDEN // HEADS, tie_word_embeddings=True),
        "gemma2": lambda: Gemma2Config(
            **llama_like, head_dim=HIDDEN // HEADS, sliding_window=128, query_pre_attn_scalar=HIDDEN // HEADS
        ),
        # Unsupported by vsteer: OPT keeps its layers at model.decoder.layers (no known path) ...
        "opt": lambda: OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN, **ids,
        ),
        # ... and StableLM has model.layers of a class vsteer does not know (StablelmDecoderLayer).
        "stablelm": lambda: StableLmConfig(**llama_like),
    }


def build_tiny_model(kind: str, folder: Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a random float32 ``kind`` model with the default tokenizer into ``folder``."""
    from transformers import AutoModelForCausalLM

    config = _configs()[kind]()
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy(src, Path(folder) / name)
    return Path(folder)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of an HF causal LM (Llama-style ``model.layers`` or GPT-2 ``transformer.h``)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner.layers
    return model.transformer.h

