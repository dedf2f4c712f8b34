"""Quiet by default: vLLM's, Ray's and other libraries' logs and Python warnings go to a log file.

``vsteer`` commands print only their own output. Unless ``--verbose`` or ``VSTEER_LOG=debug``
(``VSTEER_LOG=info`` or ``verbose``: libraries log to the terminal as usual), :func:`quiet_logging`
points vLLM's logging at a file (``VLLM_LOGGING_CONFIG_PATH``; honoured by the engine-core
process too, which inherits the environment), sends the root logger and ``warnings`` there, and
keeps transformers' own console handler to errors. The file is
``<cache>/logs/vsteer-<date>-<time>-<pid>.log`` (cache: ``$VSTEER_CACHE`` or ``~/.cache/vsteer``).
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.config
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["LOG_ENV", "ErrorsOnlyAccessFilter", "log_file", "quiet_logging", "verbose_requested"]

LOG_ENV = "VSTEER_LOG"
FILE_ENV = "VSTEER_LOG_FILE"
_SERVER_ENTRY_LOGGER = "vllm.entrypoints.launchers.api_server.entry"
_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def verbose_requested(verbose: bool = False) -> bool:
    """True with ``--verbose`` or when ``$VSTEER_LOG`` is ``debug``, ``info`` or ``verbose``."""
    return verbose or os.environ.get(LOG_ENV, "").strip().lower() in ("debug", "info", "verbose")


def log_file(*, written: bool = False) -> Path | None:
    """The log file this process writes to (None when logging goes to the terminal; with
    ``written``, also None while nothing has been logged yet)."""
    path = os.environ.get(FILE_ENV)
    if not path or (written and not os.path.exists(path)):
        return None
    return Path(path)


def logging_config(path: Path, *, serving: bool = False) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict that sends vLLM's and every other logger to ``path``.

    ``serving``: vLLM's "Starting vLLM server on http://..." and uvicorn's start-up and shutdown
    lines also go to stderr, and
    access-log lines too, but only for responses with status >= 400 (vLLM hands this config to
    uvicorn as well)."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": _FORMAT}},
        # A plain class: resolving a vsteer class here would import vsteer (and torch) before vLLM's
        # own loggers are configured in the engine's subprocess.
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path), "mode": "a",
                              "formatter": "plain", "encoding": "utf-8", "delay": True}},
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
        "root": {"handlers": ["file"], "level": "INFO"},
    }
    if serving:
        config["filters"] = {"errors_only": {"()": "vsteer._logging.ErrorsOnlyAccessFilter"}}
        config["formatters"]["brief"] = {"format": "%(message)s"}
        config["handlers"]["console"] = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                         "formatter": "brief"}
        config["handlers"]["console_errors"] = {**config["handlers"]["console"], "filters": ["errors_only"]}
        for name in ("uvicorn.error", _SERVER_ENTRY_LOGGER):  # the latter: "Starting vLLM server on http://..."
            config["loggers"][name] = {"handlers": ["file", "console"], "level": "INFO", "propagate": False}
        config["loggers"]["uvicorn.access"] = {"handlers": ["file", "console_errors"], "level": "INFO",
                                               "propagate": False}
    return config


def quiet_logging(verbose: bool = False, *, serving: bool = False) -> Path | None:
    """Send library logs and warnings to a new log file and return its path (None when verbose:
    then ``VSTEER_LOG=debug`` also sets ``VLLM_LOGGING_LEVEL=DEBUG``). ``serving``: see
    :func:`logging_config`. Call before vLLM is imported."""
    if verbose_requested(verbose):
        if os.environ.get(LOG_ENV, "").strip().lower() == "debug":
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG")
        os.environ.pop(FILE_ENV, None)
        return None
    from vsteer.models import default_cache_dir

    folder = default_cache_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"vsteer-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    config = logging_config(path, serving=serving)
    config_path = folder / f".logging-{os.getpid()}.json"
    config_path.write_text(json.dumps(config))
    atexit.register(config_path.unlink, missing_ok=True)  # the engine's processes read it at their start
    os.environ.update({"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_CONFIG_PATH": str(config_path), FILE_ENV: str(path)})
    # The engine's subprocesses: no Python warnings, no torch C++ warnings on the terminal.
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    return path


class ErrorsOnlyAccessFilter(logging.Filter):
    """Pass uvicorn access-log records only for responses with status >= 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 5:
            try:
                return int(args[4]) >= 400
            except (TypeError, ValueError):
                return True
        return True


def _configure_inherited() -> None:
    """In a subprocess of a quiet vsteer command (vLLM's engine core is spawned and imports the
    command's main module first), send logs and warnings to the parent's file before vLLM logs."""
    config_path, path = os.environ.get("VLLM_LOGGING_CONFIG_PATH"), os.environ.get(FILE_ENV)
    if not (config_path and path) or logging.getLogger().handlers:
        return
    try:
        logging.config.dictConfig(json.loads(Path(config_path).read_text()))
    except (OSError, ValueError):
        return
    logging.captureWarnings(True)


_configure_inherited()
