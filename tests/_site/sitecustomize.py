"""Test harnesses for child processes (never the package). With this folder on a child's
PYTHONPATH (tests/conftest.py: harness_env), each harness is switched on by its own variable:
$VSTEER_TEST_V2=1 (vsteer_test_v2: Model Runner V2 through Triton's interpreter) and
$VSTEER_TEST_FAULTS=1 (vsteer_test_faults: the NaN fault of tests/_faults.py). Both may be on."""

import os

if os.environ.get("VSTEER_TEST_V2") == "1":
    import vsteer_test_v2  # noqa: F401
if os.environ.get("VSTEER_TEST_FAULTS") == "1":
    import vsteer_test_faults  # noqa: F401
