"""Imported by sitecustomize when $VSTEER_TEST_FAULTS=1 (a test server's environment), every
steered runner gets the fault of tests/_faults.py once its model is loaded. The patch is applied
when vsteer.engine.runner is first imported, so nothing is imported earlier than it would be."""

import os
import sys

from vsteer_test_hooks import after_import

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _patch(module) -> None:
    sys.path.insert(0, _ROOT)
    from tests import _faults

    load = module.SteeringRunnerMixin.load_model

    def load_with_fault(self, *args, **kwargs):
        load(self, *args, **kwargs)
        _faults.install(self)

    module.SteeringRunnerMixin.load_model = load_with_fault


after_import("vsteer.engine.runner", _patch)
