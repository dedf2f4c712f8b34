#!/usr/bin/env bash
# GPU evidence for the kernels and for CUDA-graph capture/replay of the steering layer (issue 16).
#
# For a GPU machine with torch + Triton and NOTHING else: no vLLM, no package registry, vsteer
# not installed. This script installs nothing. vsteer is imported from this source tree through
# a temporary import shim (benchmarks/_gpu_shim.py: a stand-in `vsteer` package whose `kernels`
# is a symlink to the top-level kernels/ folder, removed on exit). pytest must be importable
# for step (a) (installed there, or a copy carried in .cache/gpu-pydeps: see below); without it
# (a) fails and (b), (c) still run.
#
#   (a) every `gpu`-marked test (pytest -m gpu over the test files that have such tests)
#   (b) benchmarks/gpu_kernels.py      steer / SAS op bandwidth vs a measured copy, T = 1..8192
#   (c) benchmarks/gpu_graph_stack.py  plain vs steered decoder stacks under CUDA graphs, with
#                                      replay-correctness checks against eager
#   (d) benchmarks/gpu_profile_stack.py kernel-level profile of a compiled steered stack, and the
#                                      steer op's time by warp count
# Plots of the results (no GPU needed): python benchmarks/gpu_plots.py --dir "$OUT"
#
# Usage:  bash benchmarks/gpu_evidence.sh [--smoke]
#   Results (JSON, markdown, logs, summary.json) go to $OUT when set, else benchmarks/results/gpu/.
#   PYTHON selects the interpreter (default python3). --smoke runs everything on CPU with tiny
#   sizes (GPU tests skip): a check that the script works, not a measurement.
# Time: at most ~11 minutes (each step has its own timeout; (c) skips compiled variants once its
# budget is spent); (a)-(c) took 4 minutes and (d) 1.3 on an H200 on 2026-12-04. Exit status 0
# only when every step succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SMOKE=()
if [ "${1:-}" = "--smoke" ]; then
    SMOKE=(--smoke)
elif [ -n "${1:-}" ]; then
    echo "usage: bash benchmarks/gpu_evidence.sh [--smoke]" >&2
    exit 2
fi
DEST=${OUT:-benchmarks/results/gpu}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

SHIM=$(mktemp -d "${TMPDIR:-/tmp}/vsteer-shim.XXXXXX")
trap 'rm -rf "$SHIM"' EXIT
"$PY" benchmarks/_gpu_shim.py "$SHIM" >/dev/null || { echo "cannot create the import shim in $SHIM" >&2; exit 1; }
export PYTHONPATH="$SHIM" VSTEER_USE_SHIM=1 PYTHONDONTWRITEBYTECODE=1
# A machine without pytest: carry a copy made elsewhere with
# `python benchmarks/_gpu_shim.py pack-pytest` (pure Python, into .cache/gpu-pydeps).
if [ -d .cache/gpu-pydeps ]; then
    PYTHONPATH="$PYTHONPATH:$PWD/.cache/gpu-pydeps"
fi

declare -A RC
step() {  # step NAME TIMEOUT_S CMD...: run, log to $DEST/NAME.log, remember the status
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$DEST/$name.log" 2>&1
    RC[$name]=$?
    tail -n 40 "$DEST/$name.log"
    echo "== $name: exit status ${RC[$name]} after $((SECONDS - t0)) s"
}

# Scripts run as `python benchmarks/X.py` (sys.path[0] = benchmarks/): `python -m` / `-c` / `-`
# would put this repository first on sys.path, where the real vsteer/ (without kernels/)
# shadows the shim.
"$PY" benchmarks/_gpu_shim.py environment >"$DEST/environment.json"
cat "$DEST/environment.json"

mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/*/*.py 2>/dev/null | sort -u)
if "$PY" -c "import pytest" 2>/dev/null; then
    step gpu_tests 180 "$PY" benchmarks/_gpu_shim.py pytest -m gpu -p no:cacheprovider -q -rs \
        "${GPU_TEST_FILES[@]}" --junitxml="$DEST/gpu_tests.xml"
else
    echo "pytest is not importable with $PY: the gpu-marked tests cannot run" | tee "$DEST/gpu_tests.log"
    RC[gpu_tests]=127
fi
step gpu_kernels 90 "$PY" benchmarks/gpu_kernels.py "${SMOKE[@]}" --out "$DEST"
step gpu_graph_stack 270 "$PY" benchmarks/gpu_graph_stack.py "${SMOKE[@]}" --out "$DEST" --budget-s 150
step gpu_profile_stack 120 "$PY" benchmarks/gpu_profile_stack.py "${SMOKE[@]}" --out "$DEST"

"$PY" - "$DEST" "${RC[gpu_tests]}" "${RC[gpu_kernels]}" "${RC[gpu_graph_stack]}" "${RC[gpu_profile_stack]}" "${GPU_TEST_FILES[*]}" "${SMOKE[*]:-}" <<'EOF'
import json, sys
dest, tests, kernels, stack, profile, files, smoke = sys.argv[1:8]
summary = {"smoke": smoke == "--smoke", "gpu_test_files": files.split(),
           "exit_status": {"gpu_tests": int(tests), "gpu_kernels": int(kernels), "gpu_graph_stack": int(stack),
                           "gpu_profile_stack": int(profile)}}
summary["ok"] = all(v == 0 for v in summary["exit_status"].values())
open(f"{dest}/summary.json", "w").write(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
for name in gpu_tests gpu_kernels gpu_graph_stack gpu_profile_stack; do
    [ "${RC[$name]}" = 0 ] || exit 1
done
exit 0
