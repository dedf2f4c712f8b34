"""The ``vsteer`` command line: a thin adapter over the Python API, one module per command group.

    _app.py       the root group, logging (quiet by default), ``main`` (errors as one line),
                  ``run`` (the console command: ``main``, then a fast exit)
    _common.py    options and output helpers the groups share
    demo.py       vsteer demo                 -> vsteer.demo
    models.py     vsteer models               -> vsteer.models
    generate.py   vsteer generate             -> vsteer.jobs
    extract.py    vsteer extract ...          -> vsteer.methods
    condition.py  vsteer condition search     -> vsteer.methods.condition
    vectors.py    vsteer vectors ...          -> vsteer.vectors.VectorStore
    sae.py        vsteer sae ...              -> vsteer.sae
    effects.py    vsteer effects ...          -> vsteer.effects
    eval.py       vsteer eval ...             -> vsteer.eval
    serve.py      vsteer serve                -> vsteer.server

Command modules import nothing heavy at import time (vLLM is imported by the commands that need
it) and never import this package's ``__init__``; this file only assembles them.
"""

from __future__ import annotations

from vsteer.cli._app import cli, main, run
from vsteer.cli.condition import condition
from vsteer.cli.demo import demo
from vsteer.cli.effects import effects
from vsteer.cli.eval import eval_group
from vsteer.cli.extract import extract
from vsteer.cli.generate import generate
from vsteer.cli.models import models
from vsteer.cli.sae import sae
from vsteer.cli.serve import serve
from vsteer.cli.vectors import vectors

__all__ = ["cli", "main", "run"]

for _command in (demo, serve, models, generate, extract, condition, vectors, effects, eval_group, sae):
    cli.add_command(_command)
