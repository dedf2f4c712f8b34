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


#: Pure-Python packages pytest needs (with their metadata, so pytest-timeout's entry point is seen).
PYTEST_PACKAGES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py", "pytest_timeout")


def pack_pytest(folder: str | os.PathLike[str]) -> Path:
    """Copy this interpreter's pytest and its pure-Python dependencies into ``folder`` (to carry to
    a machine that has no pytest and no package registry; gpu_evidence.sh puts
    ``.cache/gpu-pydeps`` on ``PYTHONPATH`` when it exists). Python < 3.11 there also needs
    ``tomli`` and ``exceptiongroup``, which are copied when this interpreter has them."""
    import importlib.metadata as md
    import importlib.util

    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*PYTEST_PACKAGES, "tomli", "exceptiongroup"):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            if name in ("tomli", "exceptiongroup"):
                continue
            raise RuntimeError(f"{name} is not importable here: cannot pack it")
        src = Path(spec.origin)
        if src.name == "__init__.py":
            shutil.copytree(src.parent, dest / src.parent.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / src.name)
    for dist in ("pytest", "pluggy", "iniconfig", "packaging", "pygments", "pytest-timeout"):
        try:
            info = Path(str(md.distribution(dist)._path))  # type: ignore[attr-defined]
        except md.PackageNotFoundError:
            continue
        shutil.copytree(info, dest / info.name, dirs_exist_ok=True)
    return dest


if __name__ == "__main__":
    # python benchmarks/_gpu_shim.py [DIR]             create a shim, print the folder
    # python benchmarks/_gpu_shim.py environment       print environment() as JSON
    # python benchmarks/_gpu_shim.py pytest ARGS...    run pytest (vsteer through the shim on PYTHONPATH)
    # python benchmarks/_gpu_shim.py pack-pytest [DIR] copy pytest here to DIR (.cache/gpu-pydeps)
    if len(sys.argv) > 1 and sys.argv[1] == "environment":
        import json

        print(json.dumps(environment(), indent=2))
    elif len(sys.argv) > 1 and sys.argv[1] == "pack-pytest":
        print(pack_pytest(sys.argv[2] if len(sys.argv) > 2 else REPO / ".cache" / "gpu-pydeps"))
    elif len(sys.argv) > 1 and sys.argv[1] == "pytest":
        import pytest

        sys.exit(pytest.main(sys.argv[2:]))
    else:
        print(make_shim(sys.argv[1] if len(sys.argv) > 1 else None))
