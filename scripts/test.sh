#!/usr/bin/env bash
# Run the test suite on CPU with the real vLLM engine and the real default model.
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} VLLM_CPU_KVCACHE_SPACE=1
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1 RAY_AUTH_MODE=disabled
export VSTEER_CACHE=${VSTEER_CACHE:-$PWD/.cache/vsteer}
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$(mktemp -d)}
exec .venv/bin/python -m pytest "$@"
