"""An engine-core process that outlives the process that started it exits.

vLLM starts its engine core as a child process of the API server (or of a Ray Serve replica) and
stops it when that parent shuts down; a parent that is killed (SIGKILL, the OOM killer, Ray
replacing or stopping a replica) never does, and the engine core lives on, an orphan holding the
model's memory and its workers. :func:`exit_with_parent` watches the parent from a daemon thread
(a process's parent id changes when it is orphaned) and ends the engine core the way a shutdown
would (SIGTERM, which vLLM's engine core handles), then for certain after a grace period.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

#: seconds between SIGTERM and a hard exit, for an engine core whose shutdown hangs
GRACE_SECONDS = 10.0
#: how often the parent is looked for
POLL_SECONDS = 1.0


def exit_with_parent() -> bool:
    """In a process started by ``multiprocessing`` (vLLM's engine core), end this process once its
    parent is gone. Returns whether it watches (an engine running in its caller's process does not)."""
    if multiprocessing.parent_process() is None:
        return False
    started_by = os.getppid()

    def watch() -> None:
        while os.getppid() == started_by:  # an orphan is handed to init (or a subreaper)
            time.sleep(POLL_SECONDS)
        logger.error("vsteer: the process that started this engine (pid %s) is gone; stopping the engine", started_by)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="vsteer-exit-with-parent", daemon=True).start()
    return True
