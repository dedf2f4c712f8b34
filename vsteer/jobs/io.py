"""Streaming dataset I/O: JSONL and Parquet in, JSONL and Parquet out, chosen by suffix."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from vsteer._errors import SpecError


def dataset_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise SpecError(f"cannot tell the format of {path.name}: use .jsonl or .parquet", field="path")


def iter_rows(path: Path, *, batch_rows: int = 1024) -> Iterator[tuple[int, Any]]:
    """Yield (row number, row) without loading the file whole. A JSONL line that is not JSON
    yields a ``SpecError`` as its row, so the caller can record it and go on."""
    if dataset_format(path) == "jsonl":
        with path.open() as fh:
            index = 0
            for line in fh:
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield index, SpecError(f"malformed JSON: {exc.msg}", field="row")
                index += 1
    else:
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield index, _from_parquet(row)
                index += 1


def _from_parquet(row: dict) -> dict:
    # Parquet has no "null or object" column; a steering spec may be stored as JSON text.
    out = {k: v for k, v in row.items() if v is not None}
    if isinstance(out.get("steering"), str):
        out["steering"] = json.loads(out["steering"])
    return out


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> int:
    """Write records as JSONL via a temp file + rename; returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    with os.fdopen(fd, "w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
            count += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return count


def read_jsonl(path: Path) -> Iterator[dict]:
    with path.open() as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def write_output(path: Path, parts: Iterable[Path]) -> int:
    """Concatenate JSONL part files, in order, into the output (JSONL or Parquet), atomically."""
    records = (record for part in parts for record in read_jsonl(part))
    if dataset_format(path) == "jsonl":
        return write_jsonl_atomic(path, records)
    import pyarrow as pa
    import pyarrow.parquet as pq

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    writer = None
    count = 0
    batch: list[dict] = []

    def flush() -> None:
        nonlocal writer
        table = pa.Table.from_pylist(batch, schema=writer.schema if writer else None)
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
        batch.clear()

    for record in records:
        batch.append(record)
        count += 1
        if len(batch) >= 4096:
            flush()
    if batch or writer is None:
        if not batch and writer is None:
            pq.write_table(pa.table({}), tmp)
        else:
            flush()
    if writer is not None:
        writer.close()
    os.replace(tmp, path)
    return count
