"""Pieces the store-backed CLI groups (``vsteer vectors``, ``vsteer sae``) share."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

_F = TypeVar("_F", bound=Callable[..., Any])


def store_option(envvar: str, help: str) -> Callable[[_F], _F]:
    """``--store`` (a folder, also read from ``envvar``), passed to the command as ``store_dir``."""
    return click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), envvar=envvar,
                        show_envvar=True, default=None, help=help)


def ray_options(f: _F) -> _F:
    """The options of a command that can fan its work out over a Ray pool of engines."""
    for option in reversed([
        click.option("--ray", "use_ray", is_flag=True, help="Fan chunks out over a Ray pool of engines."),
        click.option("--workers", default=2, show_default=True, help="Engine actors with --ray."),
        click.option("--cpus-per-worker", default=1.0, show_default=True),
        click.option("--gpus-per-worker", default=0.0, show_default=True),
        click.option("--ray-address", default=None, help="Join a running Ray cluster (default: start one locally)."),
    ]):
        f = option(f)
    return f


def echo_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Print ``rows`` (the first is the header) as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def echo_listing(rows: list[dict[str, Any]], *, as_json: bool, empty: str, header: tuple[str, ...],
                 cells: Callable[[dict[str, Any]], tuple[str, ...]],
                 unreadable: Callable[[dict[str, Any]], tuple[str, ...]]) -> None:
    """A store listing: JSON, or a table of ``cells(row)``. A row with ``"error"`` (an entry that
    could not be read) shows ``unreadable(row)``'s leading columns, ``?`` and ``(unreadable)``.
    ``empty`` goes to stderr when there are no rows."""
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(empty, err=True)
        return

    def damaged(r: dict[str, Any]) -> tuple[str, ...]:
        lead = unreadable(r)
        return (*lead, *["?"] * (len(header) - len(lead) - 1), "(unreadable)")

    echo_table([header, *(damaged(r) if "error" in r else cells(r) for r in rows)])


def layers_option(text: str, option: str, *, allow_all: bool) -> list[int] | None:
    """A layers option: "none" -> [], "all" -> None (when allowed), "10,12" -> [10, 12]."""
    value = text.strip().lower()
    if value in ("", "none"):
        return []
    if value == "all" and allow_all:
        return None
    try:
        layers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        words = '"none", "all"' if allow_all else '"none"'
        raise click.BadParameter(f"expected {words} or comma-separated layer numbers, got {text!r}",
                                 param_hint=option) from None
    if any(layer < 0 for layer in layers):
        raise click.BadParameter("layers are 0 or more", param_hint=option)
    return layers
