"""Quiet logging: library logs go to the log file; `vsteer serve` keeps uvicorn's start-up lines
and error access lines on the terminal."""

import logging
import logging.config
import subprocess
import sys

from vsteer._logging import logging_config


def _access(status: int) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:5000", "POST", "/v1/completions", "1.1", status), None)


def test_serving_config_prints_only_error_access_lines(tmp_path, capsys):
    path = tmp_path / "vsteer.log"
    saved = {name: (lg.handlers[:], lg.propagate, lg.level) for name in ("", "vllm", "uvicorn.access", "uvicorn.error")
             for lg in [logging.getLogger(name)]}
    try:
        logging.config.dictConfig(logging_config(path, serving=True))
        access = logging.getLogger("uvicorn.access")
        access.handle(_access(200))
        access.handle(_access(404))
        logging.getLogger("uvicorn.error").info("Uvicorn running on http://127.0.0.1:8000")
        logging.getLogger("vllm.engine").info("engine detail")
        logging.getLogger("vllm.entrypoints.launchers.api_server.entry").info("Starting vLLM server on http://127.0.0.1:8000")
        for handler in logging.getLogger().handlers:
            handler.flush()
    finally:
        for name, (handlers, propagate, level) in saved.items():
            lg = logging.getLogger(name)
            for h in lg.handlers[:]:
                lg.removeHandler(h)
                if h not in handlers:
                    h.close()
            for h in handlers:
                lg.addHandler(h)
            lg.propagate, lg.level = propagate, level
    err = capsys.readouterr().err
    assert '"POST /v1/completions HTTP/1.1" 404' in err and " 200" not in err
    assert "Uvicorn running on http://127.0.0.1:8000" in err and "engine detail" not in err
    assert "Starting vLLM server on http://127.0.0.1:8000" in err
    assert not any(line[:1].isdigit() for line in err.splitlines() if "127.0.0.1:5000" not in line)  # no timestamps
    text = path.read_text()
    assert "engine detail" in text and '" 200' in text and '" 404' in text


def test_store_command_output_is_only_its_own(tmp_path):
    """A quiet command that starts no engine prints its result and no log-file line."""
    env_cmd = [sys.executable, "-m", "vsteer.cli", "vectors", "list", "--store", str(tmp_path)]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "logs in" not in proc.stderr and "WARNING" not in proc.stderr


def test_a_subcommand_that_starts_an_engine_names_the_log_file(tmp_path):
    """`vsteer effects measure` starts an engine (a group's subcommand): the log path is printed
    once, and the logging configuration the engine reads is removed when the command ends."""
    import os
    from pathlib import Path

    env = {**os.environ, "VSTEER_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "vsteer.cli", "effects", "measure", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("vsteer: logs in ") == 1, proc.stderr
    assert Path(tmp_path, "logs").is_dir() and not list(Path(tmp_path, "logs").glob(".logging-*.json"))
