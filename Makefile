# Two commands do all the set-up: `make demo` runs steered generation, `make test` the tests.
# `make test-fast` is the edit-test loop: the suite without the compiled engine and without Ray.
.PHONY: setup demo test test-fast

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vsteer demo

# Two pytest workers; each takes whole groups of tests (tests/conftest.py: group_of), longest first.
PYTEST_WORKERS = -n 2 --no-loadscope-reorder

test: setup
	bash scripts/test.sh $(PYTEST_WORKERS)

test-fast: setup
	bash scripts/test.sh $(PYTEST_WORKERS) -m "not compiled and not ray and not gpu"
