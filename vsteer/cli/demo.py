"""``vsteer demo``: steer the default model with a love-minus-hate vector (see :mod:`vsteer.demo`)."""

from __future__ import annotations

import click

from vsteer.demo import DEFAULT_LAYER, DEFAULT_SCALE

__all__ = ["demo"]


@click.command()
@click.option("--layer", default=DEFAULT_LAYER, show_default=True, help="Decoder layer to read and steer.")
@click.option("--scale", default=DEFAULT_SCALE, show_default=True, help="Scale of the unit-norm vector.")
@click.option("--max-tokens", default=24, show_default=True, help="Tokens per completion (the sweep measured 24).")
@click.option("--eager/--compile", default=True, show_default=True, help="enforce_eager or torch.compile.")
@click.option("--dtype", default="float32", show_default=True,
              help="Engine dtype (float32 gives the same tokens on every CPU; auto: the model's bfloat16).")
def demo(layer: int, scale: float, max_tokens: int, eager: bool, dtype: str) -> None:
    """Steer the embedded SmolLM2 both ways with a love-minus-hate vector computed inside vLLM,
    and score each completion."""
    import os

    from vsteer.demo import run_demo

    # One batch, then exit: the engine runs in this process (no engine-core subprocess to start).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    run_demo(layer=layer, scale=scale, max_tokens=max_tokens, eager=eager, dtype=dtype)
