# Two commands do all the set-up: `make demo` runs steered generation, `make test` the tests.
# `make test-fast` is the edit-test loop: the suite without the compiled engine and without Ray.
.PHONY: setup demo test test-fast

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vsteer demo

test: setup
	bash scripts/test.sh

test-fast: setup
	bash scripts/test.sh -m "not compiled and not ray and not gpu"
