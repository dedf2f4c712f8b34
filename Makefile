# Two commands do all the set-up: `make demo` runs steered generation, `make test` the tests.
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/vsteer demo

test: setup
	bash scripts/test.sh
