"""Patch a module right after its first import, so a harness imports nothing earlier than the
process would (used by the harnesses of this folder)."""

import importlib.abc
import importlib.util
import sys
from typing import Callable

_PATCHES: dict[str, list[Callable]] = {}


class _OnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patches = _PATCHES.pop(name, None)
        if patches is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            if _PATCHES:
                sys.meta_path.insert(0, self)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            for patch in patches:
                patch(module)

        spec.loader.exec_module = exec_module
        return spec


_FINDER = _OnImport()


def after_import(name: str, patch: Callable) -> None:
    """Call ``patch(module)`` once module ``name`` has been imported (it must not be yet)."""
    assert name not in sys.modules, f"{name} is already imported"
    _PATCHES.setdefault(name, []).append(patch)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
