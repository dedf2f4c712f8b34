"""``python -m vsteer.cli ...``: the same as the ``vsteer`` command."""

from vsteer.cli import run

run()
