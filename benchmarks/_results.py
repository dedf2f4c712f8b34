"""Writing one benchmark's section of benchmarks/RESULTS.md (replaced in place on a rerun)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(title: str, section: str, path: Path = RESULTS) -> None:
    """Replace the section headed ``title`` (a ``## `` line) with ``section``, or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if title in text:
        start = text.index(title)
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
