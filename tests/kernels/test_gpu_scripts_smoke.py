"""benchmarks/gpu_evidence.sh stays runnable: the whole script with --smoke, on CPU.

The script is meant for a GPU machine without vLLM, a package registry or an installed vsteer;
here it runs with this interpreter, tiny sizes and no CUDA (GPU tests skip, no CUDA graphs). The
test checks that vsteer came through the script's import shim (not the installed package), that
the shim is gone afterwards, that importing the kernels and the layer wrapping loaded no vLLM,
and that both benchmarks wrote complete results whose correctness checks pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_evidence_script_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_evidence.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["smoke"]
    assert "tests/kernels/test_sas_triton.py" in summary["gpu_test_files"]

    envinfo = json.loads((tmp_path / "environment.json").read_text())
    assert envinfo["vsteer_from"] == "shim"
    shim_kernels = Path(envinfo["vsteer_kernels_file"])
    assert shim_kernels.parts[-3:] == ("vsteer", "kernels", "__init__.py") and ROOT not in shim_kernels.parents
    assert not shim_kernels.parents[2].exists(), "the import shim was not removed"
    assert envinfo["vsteer_engine_layers_file"] == str(ROOT / "vsteer" / "engine" / "layers.py")
    assert envinfo["vllm_loaded_by_vsteer_imports"] is False

    # the gpu-marked tests were collected (and skipped: no GPU here), through the shim
    tests_log = (tmp_path / "gpu_tests.log").read_text()
    assert "skipped" in tests_log and "error" not in tests_log.lower()

    kernels = json.loads((tmp_path / "gpu_kernels.json").read_text())
    assert kernels["smoke"] and kernels["all_match_reference"] and kernels["vsteer_from"].startswith("shim:")
    assert {(r["op"], r["tokens"]) for r in kernels["rows"]} == {(op, t) for op in ("steer", "sas") for t in (1, 7)}
    assert all(r["gbs"] > 0 and r["us_per_token"] > 0 for r in kernels["rows"])
    assert (tmp_path / "gpu_kernels.md").read_text().startswith("## GPU kernels")

    stack = json.loads((tmp_path / "gpu_graph_stack.json").read_text())
    assert stack["complete"] and stack["all_ok"] and stack["vsteer_from"].startswith("shim:")
    (model,) = stack["models"]
    scenarios = {r["scenario"] for r in model["rows"]}
    assert "plain" in scenarios and "SAS one layer, support 128, K=256" in scenarios
    assert "all layers, 4 composed vectors, K=1" in scenarios and len(scenarios) == 11
    assert len(model["checks"]) == 10 and all(c["replay0"]["steer_effect"] > 0 for c in model["checks"])
    assert "Smoke run" in (tmp_path / "gpu_graph_stack.md").read_text()

    profile = json.loads((tmp_path / "gpu_profile_stack.json").read_text())
    assert profile["smoke"] and profile["profile"]["plain"] and profile["profile"]["all"]
    assert summary["exit_status"]["gpu_profile_stack"] == 0

    # the plots script reads what the run wrote
    plots = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_plots.py"), "--dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert plots.returncode == 0, plots.stderr[-3000:]
    assert (tmp_path / "gpu-kernels.png").stat().st_size > 10_000 and (tmp_path / "gpu-graph-stack.png").stat().st_size > 10_000
