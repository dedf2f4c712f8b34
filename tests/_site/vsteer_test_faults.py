"""Imported by sitecustomize when $VSTEER_TEST_FAULTS=1 (a test server's environment), every
steered runner gets the fault of tests/_faults.py once its model is loaded. The patch is applied
when vsteer.engine.runner is first imported, so nothing is imported earlier than it would be."""

import importlib.abc
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _patch(module) -> None:
    sys.path.insert(0, _ROOT)
    from tests import _faults

    load = module.SteeringRunnerMixin.load_model

    def load_with_fault(self, *args, **kwargs):
        load(self, *args, **kwargs)
        _faults.install(self)

    module.SteeringRunnerMixin.load_model = load_with_fault


class _OnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "vsteer.engine.runner":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _OnImport())
