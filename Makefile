# Two commands do all the set-up: `make demo` runs steered generation, `make test` the tests.
# `make test-fast` is the edit-test loop: the suite without the compiled engine and without Ray.
.PHONY: setup demo test test-fast

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vsteer demo

# One pytest process: two workers (`bash scripts/test.sh -n 2 --dist loadgroup`) took 16.5 minutes where
# one process took 27 on a 2-core machine but need more than 20 GiB and ran out of memory on a 24 GiB one.
test: setup
	bash scripts/test.sh

test-fast: setup
	bash scripts/test.sh -m "not compiled and not ray and not gpu"
