"""Import vsteer's torch-only parts straight from a source tree, with nothing installed.

On the GPU test machine (torch + Triton, no vLLM, no package registry) vsteer is not installed,
and ``vsteer.kernels`` is not a folder of ``vsteer/``: the wheel maps the top-level ``kernels/``
folder to it (``[tool.setuptools.package-dir]`` in pyproject.toml). The shim is a temporary
folder holding a stand-in ``vsteer`` package:

- ``vsteer/__init__.py`` extends the package path with the repository's ``vsteer/``, so
  ``vsteer._errors``, ``vsteer.engine.layers`` and the other subpackages load from the tree; it
  does not run the real ``vsteer/__init__.py`` (which imports pydantic, safetensors, ...);
- ``vsteer/kernels`` is a symlink to the repository's ``kernels/``.

Nothing is written into the repository, no ``.pth`` file is used, and the top-level ``kernels``
name is never made importable. Use it from bash (``python benchmarks/_gpu_shim.py DIR`` prints
the folder to put first on ``PYTHONPATH``) or from Python (:func:`use_shim`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_INIT = '''"""Stand-in vsteer package (benchmarks/_gpu_shim.py): torch-only parts, from {repo}."""
__path__.append({vsteer!r})
VSTEER_SHIM = True
'''


def make_shim(folder: str | os.PathLike[str] | None = None) -> Path:
    """Create the shim under ``folder`` (a new temporary folder by default); return the folder to
    put first on ``sys.path`` / ``PYTHONPATH``."""
    root = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="vsteer-shim-"))
    pkg = root / "vsteer"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(_INIT.format(repo=REPO, vsteer=str(REPO / "vsteer")))
    link = pkg / "kernels"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(REPO / "kernels", target_is_directory=True)
    return root


def use_shim() -> Path:
    """Make ``import vsteer.kernels`` / ``vsteer.engine.layers`` resolve through a fresh shim in
    this process (an installed vsteer, if any, is shadowed); return the shim folder, which is
    removed when the process exits."""
    root = make_shim()
    atexit.register(shutil.rmtree, root, True)
    for name in [m for m in sys.modules if m == "vsteer" or m.startswith("vsteer.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    return root


def ensure_vsteer() -> str:
    """Import ``vsteer.kernels``; return ``"shim"`` or ``"installed"`` (where it came from).

    A shim already on ``sys.path`` (``PYTHONPATH`` set by gpu_evidence.sh) is used as is. Else
    the installed package, unless ``VSTEER_USE_SHIM=1`` or there is none: then a new shim."""
    try:
        import vsteer
        import vsteer.kernels  # noqa: F401

        if getattr(vsteer, "VSTEER_SHIM", False):
            return "shim"
        if os.environ.get("VSTEER_USE_SHIM") != "1":
            return "installed"
    except ImportError:
        pass
    use_shim()
    import vsteer.kernels  # noqa: F401, F811

    return "shim"


def environment() -> dict[str, object]:
    """What the machine offers (python, torch, CUDA device, Triton, vLLM, pytest) and where
    ``vsteer.kernels`` / ``vsteer.engine.layers`` were imported from."""
    import platform

    import torch

    info: dict[str, object] = {"python": sys.version.split()[0], "platform": platform.platform(),
                               "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                               "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"not importable: {exc}"
    import importlib.util

    for name in ("vllm", "pytest"):
        info[name] = "importable" if importlib.util.find_spec(name) is not None else "absent"
    info["vsteer_from"] = ensure_vsteer()
    import vsteer.engine.layers
    import vsteer.kernels

    info["vsteer_kernels_file"] = vsteer.kernels.__file__
    info["vsteer_engine_layers_file"] = vsteer.engine.layers.__file__
    # The GPU machine has no vLLM: importing the kernels and the layer wrapping must not load it.
    info["vllm_loaded_by_vsteer_imports"] = any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)
    return info


if __name__ == "__main__":
    # python benchmarks/_gpu_shim.py [DIR]             create a shim, print the folder
    # python benchmarks/_gpu_shim.py environment       print environment() as JSON
    # python benchmarks/_gpu_shim.py pytest ARGS...    run pytest (vsteer through the shim on PYTHONPATH)
    if len(sys.argv) > 1 and sys.argv[1] == "environment":
        import json

        print(json.dumps(environment(), indent=2))
    elif len(sys.argv) > 1 and sys.argv[1] == "pytest":
        import pytest

        sys.exit(pytest.main(sys.argv[2:]))
    else:
        print(make_shim(sys.argv[1] if len(sys.argv) > 1 else None))
