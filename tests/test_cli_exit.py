"""`vsteer` (``vsteer.cli.run``) skips the interpreter's teardown but keeps what a normal exit
does: other threads finish, atexit handlers run, buffered output is written, the code is kept."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import subprocess_env

CHILD = """
import atexit, sys, threading, time
from vsteer.cli import run

def late():
    time.sleep(0.5)
    print("thread finished")

threading.Thread(target=late).start()
atexit.register(lambda: print("atexit ran"))
sys.stdout.write("buffered, no newline")
sys.argv = ["vsteer", *sys.argv[1:]]
run()
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())


def test_a_command_exits_0_after_threads_atexit_and_buffered_output(model_path):
    proc = _run("models", "path", "smollm2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("buffered, no newline")
    assert model_path in proc.stdout and "thread finished" in proc.stdout
    assert proc.stdout.rstrip().endswith("atexit ran")


def test_an_error_keeps_its_exit_code_and_line():
    proc = _run("vectors", "show", "no-such-vector", "--store", "/nonexistent-vsteer-store")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("VectorFileError: no vector with this name")
    assert "atexit ran" in proc.stdout
    usage = _run("no-such-command")
    assert usage.returncode == 2 and "No such command" in usage.stderr
