# Two commands do all the set-up: `make demo` runs steered generation, `make test` the tests.
# `make test-fast` is the edit-test loop: the suite without the compiled engine and without Ray.
.PHONY: setup demo test test-fast

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vsteer demo

# Two pytest workers (the machines have 2 cores and the engines run 1 thread each); one test
# module per worker at a time. `bash scripts/test.sh PATH` runs a part in one process.
test: setup
	bash scripts/test.sh -n 2 --dist loadgroup

test-fast: setup
	bash scripts/test.sh -n 2 --dist loadgroup -m "not compiled and not ray and not gpu"
