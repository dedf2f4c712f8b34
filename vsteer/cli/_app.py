"""The root ``vsteer`` group and :func:`main`: quiet logging, errors as one line."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

import click

from vsteer._errors import VsteerError
from vsteer._logging import log_file, quiet_logging

__all__ = ["cli", "main", "run"]


def _quiet_defaults() -> None:
    # vsteer never talks to a model hub or a usage-stats server.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    # On CPU, vLLM otherwise reserves 92% of RAM and refuses to start when others use memory.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


#: Commands that start an engine (and so write to the log file): (command, subcommand or None).
_ENGINE_COMMANDS = {("demo", None), ("serve", None), ("generate", None), ("extract", None), ("effects", "measure"),
                    ("eval", "run"), ("sae", "train"),
                    ("condition", "search")}


@click.group()
@click.option("-v", "--verbose", is_flag=True,
              help="Show vLLM's, Ray's and the libraries' logs here instead of in the log file (or VSTEER_LOG=debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """vsteer: per-request activation steering inside vLLM.

    Commands print only their own output; vLLM's and the libraries' logs go to a file whose
    path is printed once (see --verbose).
    """
    _quiet_defaults()
    path = quiet_logging(verbose, serving=ctx.invoked_subcommand == "serve")
    sub = _word_after(_ARGV if _ARGV is not None else sys.argv[1:], ctx.invoked_subcommand)
    if path is not None and ({(ctx.invoked_subcommand, None), (ctx.invoked_subcommand, sub)} & _ENGINE_COMMANDS):
        click.echo(f"vsteer: logs in {path}", err=True)


#: The arguments main() was called with: Click resolves subcommands only after the group's callback
#: runs (ctx.args is empty there), so the callback reads the subcommand's own subcommand from here.
_ARGV: list[str] | None = None


def _word_after(argv: Sequence[str], command: str | None) -> str | None:
    """The argument after ``command`` in ``argv`` when it is a word (a group's subcommand)."""
    if command not in argv:
        return None
    rest = list(argv)[list(argv).index(command) + 1 :]
    return rest[0] if rest and not rest[0].startswith("-") else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI; a vsteer error prints ``ErrorName: message`` and exits 1. Other
    errors print one line naming the log file that holds the traceback (the traceback itself
    with ``--verbose``)."""
    global _ARGV
    _ARGV = list(argv) if argv is not None else sys.argv[1:]
    try:
        cli.main(args=_ARGV, prog_name="vsteer", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except VsteerError as exc:
        click.echo(f"{type(exc).__name__}: {exc}{_log_hint()}", err=True)
        return 1
    except Exception as exc:
        if log_file() is None:  # verbose: the full traceback, as Python prints it
            raise
        logging.getLogger("vsteer").exception("vsteer failed")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"{type(exc).__name__}: {first} (traceback and engine logs: {log_file()})", err=True)
        return 1
    return 0


def _log_hint() -> str:
    path = log_file(written=True)
    return "" if path is None else f" (engine logs: {path})"


def run() -> NoReturn:
    """The ``vsteer`` command: :func:`main`, then exit without finalizing the interpreter.

    Tearing down the modules vLLM and torch loaded takes about 2 s after an engine has run, on every
    command. Everything a normal exit does for the user still happens first: other threads finish,
    atexit handlers run (engine shutdown, log handlers flushed), stdout and stderr are flushed."""
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # under a profiler or debugger, which report after the command returns
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what interpreter shutdown would run; the module teardown after it is skipped
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`vsteer vectors list | head`) or a closed stream
            pass
    os._exit(code)
