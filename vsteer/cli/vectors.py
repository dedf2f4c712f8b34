"""``vsteer vectors``: list, show, import, export and remove vectors in a `VectorStore` (the
PostgreSQL registry when ``$VSTEER_REGISTRY_URL`` is set), and copy a folder store into it.

A thin adapter over `VectorStore`: errors are raised as vsteer errors and printed by
``vsteer.cli.main`` as ``ErrorName: message`` (exit 1). Results go to stdout, notes to stderr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from vsteer._errors import VectorFileError
from vsteer.cli._common import echo_listing, store_option
from vsteer.vectors import VectorStore

__all__ = ["vectors"]

STORE_ENV = "VSTEER_VECTOR_STORE"

_store_option = store_option(
    STORE_ENV, "Vector store folder [default: <cache>/vectors, the cache being $VSTEER_CACHE or ~/.cache/vsteer].")


def _open_store(store_dir: Path | None) -> VectorStore:
    if store_dir is None:
        from vsteer.models import default_vector_store

        store_dir = default_vector_store()
    from vsteer.vectors._pg_store import open_store

    return open_store(Path(os.path.expanduser(store_dir)))


def _layers_text(layers: list[int]) -> str:
    """``[4, 5, 6, 9]`` -> ``"4-6,9"``."""
    parts: list[str] = []
    start = prev = None
    for layer in layers + [None]:  # type: ignore[list-item]
        if start is not None and (layer is None or layer != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if layer is not None:
            if start is None:
                start = layer
            prev = layer
    return ",".join(parts)


@click.group()
def vectors() -> None:
    """Steering vectors in the local store (content-addressed, with names)."""


@vectors.command("list")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of each vector's info instead of a table.")
def list_vectors(store_dir: Path | None, as_json: bool) -> None:
    """List the stored vectors."""
    store = _open_store(store_dir)
    rows: list[dict[str, Any]] = []
    for sha in store.list():
        try:
            rows.append(store.info(sha))
        except VectorFileError as exc:
            # One damaged file should not hide the others.
            rows.append({"sha256": sha, "error": str(exc)})
    echo_listing(
        rows, as_json=as_json, empty=f"no vectors in {store.root}",
        header=("NAMES", "SHA256", "MODEL", "HIDDEN", "LAYERS", "METHOD"),
        cells=lambda r: (",".join(r["names"]) or "-", r["sha256"][:12], r["model"] or "-", str(r["hidden_size"]),
                         _layers_text(r["layers"]), r["method"]),
        unreadable=lambda r: ("-", r["sha256"][:12]),
    )


@vectors.command("show")
@click.argument("ref")
@_store_option
def show(ref: str, store_dir: Path | None) -> None:
    """Print everything known about the vector REF (a name or sha256) as JSON."""
    store = _open_store(store_dir)
    info = store.info(ref)
    info["path"] = str(store.path(info["sha256"]))
    click.echo(json.dumps(info, indent=2))


@vectors.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Also register the vector under this name (1-64 of A-Z a-z 0-9 . _ -).")
@click.option("--model", default=None, help="Refuse the file if its vector was made for another model.")
@click.option("--overwrite", is_flag=True, help="Re-point --name if it already names another vector.")
@_store_option
def import_(file: Path, name: str | None, model: str | None, overwrite: bool, store_dir: Path | None) -> None:
    """Store the vector in FILE (.safetensors or .gguf) and print its sha256."""
    store = _open_store(store_dir)
    sha = store.import_file(file, name=name, expected_model=model, overwrite=overwrite)
    click.echo(sha)


@vectors.command("export")
@click.argument("ref")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model-hint", default=None,
              help="For .gguf: the target's HF model_type (e.g. llama); defaults to the hint the vector was imported with.")
@_store_option
def export(ref: str, out: Path, model_hint: str | None, store_dir: Path | None) -> None:
    """Write the vector REF (a name or sha256) to OUT (.safetensors or .gguf)."""
    store = _open_store(store_dir)
    store.export(ref, out, model_hint=model_hint)
    click.echo(f"wrote {out}", err=True)


@vectors.command("rm")
@click.argument("ref")
@click.option("--name-only", is_flag=True, help="Remove only the name REF and keep the vector.")
@_store_option
def rm(ref: str, name_only: bool, store_dir: Path | None) -> None:
    """Remove the vector REF (a name or sha256) and every name pointing at it."""
    store = _open_store(store_dir)
    if name_only:
        store.remove_name(ref)
        click.echo(f"removed name {ref}", err=True)
        return
    sha = store.resolve(ref)  # a VectorFileError for an unknown REF, before anything changes
    names = [name for name, target in store.names().items() if target == sha]
    store.delete(sha)
    suffix = f" (names: {', '.join(names)})" if names else ""
    click.echo(f"removed {sha[:12]}{suffix}", err=True)


@vectors.command("import-store")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tenants", "tenants_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The server's tenants file: also copy these tenants' vectors and names (FOLDER/tenants/*.json).")
@_store_option
def import_store(folder: Path, tenants_file: Path | None, store_dir: Path | None) -> None:
    """Copy a folder store (vectors, names, and with --tenants the tenants' ownership) into the
    PostgreSQL registry of $VSTEER_REGISTRY_URL. Names already taken there are reported and kept."""
    from vsteer.vectors._pg_store import PgVectorStore, registry_url

    url = registry_url()
    if url is None:
        raise VectorFileError("set $VSTEER_REGISTRY_URL to the registry to import into", key="VSTEER_REGISTRY_URL")
    target = _open_store(store_dir)
    assert isinstance(target, PgVectorStore)
    counts = target.import_folder(VectorStore(folder))
    click.echo(f"copied {counts['vectors']} vectors and {counts['names']} names"
               + (f"; {counts['conflicts']} names already point elsewhere and were kept" if counts["conflicts"] else ""),
               err=True)
    if tenants_file is not None:
        from vsteer.server.tenants import TenantsFile
        from vsteer.server.tenants_pg import PgTenantDirectory

        config = TenantsFile.model_validate_json(tenants_file.read_text())
        directory = PgTenantDirectory(config, target.root, url)
        click.echo(f"copied the vectors and names of {directory.import_folder(folder)} tenants", err=True)
