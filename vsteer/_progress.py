"""Progress display for long steps (engine start, model conversion, capture, generation)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def step(label: str, *, enabled: bool | None = None) -> Iterator[None]:
    """Show ``label`` with a running clock on stderr while the block runs (a tqdm bar of unknown
    length), then ``label: done (12.3 s)``. Off when stderr is not a terminal, unless ``enabled``."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield
        return
    bar = tqdm(total=None, desc=label, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    started = time.monotonic()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        bar.close()
        print(f"{label}: {'done' if ok else 'failed'} ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
