"""``vsteer models``: local models (the embedded default model is converted on first use)."""

from __future__ import annotations

import click

__all__ = ["models"]


@click.group()
def models() -> None:
    """Local models."""


@models.command("path")
@click.argument("name", default="smollm2")
def models_path(name: str) -> None:
    """Print the local HF folder of NAME (preparing the default model if needed)."""
    from vsteer.models import resolve_model

    click.echo(resolve_model(name))
