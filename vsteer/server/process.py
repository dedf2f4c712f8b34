"""Helpers for running ``vsteer serve`` as a child process (tests, benchmarks, Ray Serve)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(base_url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Block until ``base_url/health`` answers; raise if ``proc`` exits or ``timeout`` passes."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vsteer serve exited with {proc.returncode} before it was healthy")
        try:
            urllib.request.urlopen(base_url + "/health", timeout=2)
            return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"vsteer serve was not healthy after {timeout:.0f} s") from None
            time.sleep(1)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Terminate a server process, killing it if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
