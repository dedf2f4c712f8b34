"""Test harnesses for child processes (never the package). With this folder on a child's
PYTHONPATH (tests/conftest.py: harness_env), each harness is switched on by its own variable:
$VSTEER_TEST_V2=1 (vsteer_test_v2: Model Runner V2 through Triton's interpreter),
$VSTEER_TEST_ASYNC=1 (vsteer_test_async: an engine that asks for async scheduling keeps it, on
either runner) and $VSTEER_TEST_FAULTS=1 (vsteer_test_faults: the NaN fault of tests/_faults.py).
Any of them may be on together."""

import os

if os.environ.get("VSTEER_TEST_V2") == "1":
    import vsteer_test_v2  # noqa: F401
if os.environ.get("VSTEER_TEST_ASYNC") == "1":
    import vsteer_test_async  # noqa: F401
if os.environ.get("VSTEER_TEST_FAULTS") == "1":
    import vsteer_test_faults  # noqa: F401
