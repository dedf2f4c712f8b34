"""Vector files: vsteer safetensors, llama.cpp / repeng GGUF control vectors, and dispatch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vsteer._errors import VectorFileError
from vsteer.vectors import (
    SteeringVector,
    load_gguf,
    load_safetensors,
    load_vector,
    save_gguf,
    save_safetensors,
    save_vector,
)

HIDDEN = 6


def make(layers=(3, 10, 11), *, seed=0, **kwargs) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return SteeringVector.from_tensors(
        {layer: torch.randn(HIDDEN, generator=gen) * 3 for layer in layers}, **kwargs
    )


def assert_same_numbers(a: SteeringVector, b: SteeringVector) -> None:
    assert a.layer_indices == b.layer_indices
    assert a.hidden_size == b.hidden_size
    for layer in a.layers:
        # bitwise, not approximate: a round trip must be exact
        assert a.layers[layer].numpy().tobytes() == b.layers[layer].numpy().tobytes()
    assert a.sha256 == b.sha256


VSTEER_META = {
    "vsteer.format_version": "1",
    "vsteer.model": json.dumps({"name": "m", "hidden_size": HIDDEN}),
    "vsteer.method": "caa",
    "vsteer.provenance": "{}",
}


def write_st(path: Path, tensors: dict, metadata: dict | None = VSTEER_META) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_gguf(path: Path, tensors: dict, *, arch="controlvector", hint="llama", layer_count=None) -> Path:
    """Write a control vector the way repeng's export_gguf does, by hand."""
    writer = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(tensors) if layer_count is None else layer_count)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ones(n=HIDDEN, dtype=np.float32):
    return np.ones(n, dtype=dtype)


# ================================================================ safetensors


def test_safetensors_round_trip_is_exact(tmp_path):
    v = make(
        model="SmolLM2-135M-Instruct",
        method="caa",
        provenance={"dataset_sha256": "ab" * 32, "prompts": ["héllo", "☃"], "layers": [3, 10], "scale": 0.5},
    )
    path = tmp_path / "v.safetensors"
    save_safetensors(v, path)
    w = load_safetensors(path)
    assert_same_numbers(v, w)
    assert w == v
    assert (w.model, w.method, w.provenance) == (v.model, v.method, v.provenance)
    assert w.dtype == torch.float32
    assert not list(tmp_path.glob("*.tmp"))


def test_safetensors_layout_matches_design(tmp_path):
    path = tmp_path / "v.safetensors"
    save_safetensors(make(model=None, provenance={"a": 1}), path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["layer.10", "layer.11", "layer.3"]
        assert f.get_tensor("layer.3").dtype == torch.float32
        assert f.get_tensor("layer.3").shape == (HIDDEN,)
        meta = f.metadata()
    assert meta["vsteer.format_version"] == "1"
    assert json.loads(meta["vsteer.model"]) == {"name": None, "hidden_size": HIDDEN}
    assert meta["vsteer.method"] == "custom"
    assert json.loads(meta["vsteer.provenance"]) == {"a": 1}


def test_safetensors_saves_other_dtypes_as_float32(tmp_path):
    v = make().to(dtype=torch.bfloat16)
    save_safetensors(v, tmp_path / "v.safetensors")
    w = load_safetensors(tmp_path / "v.safetensors")
    assert w.dtype == torch.float32 and w.sha256 == v.sha256


def test_safetensors_without_vsteer_metadata_is_read(tmp_path):
    path = write_st(
        tmp_path / "foreign.safetensors",
        {"layer.12": torch.ones(4, dtype=torch.float16), "layer.2": torch.zeros(4)},
        metadata={"format": "pt"},
    )
    v = load_safetensors(path)
    assert v.layer_indices == [2, 12] and v.hidden_size == 4
    assert v.model is None and v.method == "custom" and v.provenance == {}
    assert v.dtype == torch.float32


def test_safetensors_refuses_negative_layers(tmp_path):
    v = SteeringVector.from_tensors({-1: [1.0]})
    with pytest.raises(VectorFileError) as err:
        save_safetensors(v, tmp_path / "v.safetensors")
    assert err.value.key == "layer.-1" and "normalize_layers" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", sorted(VSTEER_META))
def test_safetensors_missing_metadata_key(tmp_path, missing):
    meta = {k: v for k, v in VSTEER_META.items() if k != missing}
    path = write_st(tmp_path / "v.safetensors", {"layer.1": torch.zeros(HIDDEN)}, meta)
    with pytest.raises(VectorFileError) as err:
        load_safetensors(path)
    assert err.value.key == missing and err.value.path == str(path)
    assert missing in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("vsteer.format_version", "2", "newer|upgrade"),
        ("vsteer.format_version", "one", "integer"),
        ("vsteer.format_version", "0", "unknown format version"),
        ("vsteer.model", "not json", "JSON"),
        ("vsteer.model", "[1]", "object"),
        ("vsteer.model", json.dumps({"name": "m"}), "hidden_size"),
        ("vsteer.model", json.dumps({"name": 5, "hidden_size": HIDDEN}), "name"),
        ("vsteer.method", "", "method"),
        ("vsteer.provenance", "[]", "object"),
        ("vsteer.provenance", "{", "JSON"),
    ],
)
def test_safetensors_bad_metadata_value(tmp_path, key, value, match):
    path = write_st(tmp_path / "v.safetensors", {"layer.1": torch.zeros(HIDDEN)}, {**VSTEER_META, key: value})
    with pytest.raises(VectorFileError, match=match) as err:
        load_safetensors(path)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("tensors", "key"),
    [
        ({"layer.1": torch.zeros(HIDDEN), "bias": torch.zeros(HIDDEN)}, "bias"),
        ({"layer.x": torch.zeros(HIDDEN)}, "layer.x"),
        ({"layer.-1": torch.zeros(HIDDEN)}, "layer.-1"),
        ({"layer.01": torch.zeros(HIDDEN)}, "layer.01"),
        ({"layer.1": torch.zeros(HIDDEN), "layer.4": torch.zeros(2, HIDDEN)}, "layer.4"),
        ({"layer.1": torch.zeros(HIDDEN), "layer.4": torch.zeros(HIDDEN + 1)}, "layer.4"),
        ({"layer.2": torch.zeros(HIDDEN - 1)}, "layer.2"),
        ({"layer.3": torch.tensor([0.0, 0, 0, float("nan"), 0, 0])}, "layer.3"),
        ({"layer.3": torch.tensor([0.0, 0, 0, float("-inf"), 0, 0])}, "layer.3"),
        ({"layer.5": torch.zeros(HIDDEN, dtype=torch.int32)}, "layer.5"),
    ],
)
def test_safetensors_bad_tensor(tmp_path, tensors, key):
    path = write_st(tmp_path / "v.safetensors", tensors)
    with pytest.raises(VectorFileError) as err:
        load_safetensors(path)
    assert err.value.key == key and key in str(err.value)


def test_safetensors_foreign_file_with_mismatched_lengths(tmp_path):
    path = write_st(
        tmp_path / "v.safetensors", {"layer.1": torch.zeros(4), "layer.2": torch.zeros(5)}, metadata=None
    )
    with pytest.raises(VectorFileError, match="length 5") as err:
        load_safetensors(path)
    assert err.value.key == "layer.2"


def test_safetensors_not_a_safetensors_file(tmp_path):
    path = tmp_path / "v.safetensors"
    path.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(VectorFileError, match="safetensors"):
        load_safetensors(path)
    with pytest.raises(VectorFileError, match="no such"):
        load_safetensors(tmp_path / "missing.safetensors")


def test_safetensors_without_tensors(tmp_path):
    path = write_st(tmp_path / "v.safetensors", {}, VSTEER_META)
    with pytest.raises(VectorFileError, match="no layer"):
        load_safetensors(path)


# ================================================================ GGUF


def test_gguf_round_trip_is_exact(tmp_path):
    v = make(model="SmolLM2-135M-Instruct", method="caa", provenance={"x": 1})
    path = tmp_path / "v.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer 0, so no warning
        save_gguf(v, path, model_hint="llama")
    w = load_gguf(path)
    assert_same_numbers(v, w)
    assert w.model is None
    assert w.provenance == {"gguf_model_hint": "llama"}
    assert w.method == "custom"
    assert not list(tmp_path.glob("*.tmp"))


def test_gguf_layout_matches_llama_cpp(tmp_path):
    v = make(layers=(1, 5))
    path = tmp_path / "v.gguf"
    save_gguf(v, path, model_hint="qwen2")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "qwen2"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.5"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [HIDDEN]
    np.testing.assert_array_equal(reader.tensors[1].data, v.layers[5].numpy())


def test_gguf_layer_zero_warns(tmp_path):
    v = make(layers=(0, 4))
    with pytest.warns(UserWarning, match="llama.cpp.*refuse"):
        save_gguf(v, tmp_path / "v.gguf", model_hint="llama")
    # vsteer still reads it, layer 0 included
    assert load_gguf(tmp_path / "v.gguf").layer_indices == [0, 4]


def test_gguf_written_by_hand_in_repeng_layout(tmp_path):
    directions = {13: np.linspace(-1, 1, HIDDEN, dtype=np.float32), 2: np.arange(HIDDEN, dtype=np.float32)}
    tensors = {f"direction.{k}": a for k, a in directions.items()}
    path = write_gguf(tmp_path / "repeng.gguf", tensors, hint="mistral")
    v = load_gguf(path)
    assert v.layer_indices == [2, 13]
    assert v.hidden_size == HIDDEN
    for layer, array in directions.items():
        np.testing.assert_array_equal(v.layers[layer].numpy(), array)
    assert v.provenance == {"gguf_model_hint": "mistral"} and v.model is None


def test_gguf_cvector_generator_file_imports_as_written(tmp_path):
    # llama.cpp's cvector-generator: int32 layer_count, direction.1..N (measured one layer earlier)
    writer = gguf.GGUFWriter(str(tmp_path / "cv.gguf"), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", 3)
    for layer in (1, 2, 3):
        writer.add_tensor(f"direction.{layer}", np.full(HIDDEN, layer, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    v = load_gguf(tmp_path / "cv.gguf")
    assert v.layer_indices == [1, 2, 3]
    assert v.layers[3].tolist() == [3.0] * HIDDEN


def test_gguf_without_model_hint_and_odd_layer_count(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", {"direction.7": ones()}, hint=None, layer_count=32)
    v = load_gguf(path)
    assert v.layer_indices == [7] and v.provenance == {}


def test_gguf_float16_tensor_is_upcast(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", {"direction.7": ones(dtype=np.float16) / 3})
    v = load_gguf(path)
    assert v.dtype == torch.float32
    assert v.layers[7].tolist() == [float(np.float16(1) / np.float16(3))] * HIDDEN


@pytest.mark.parametrize(
    ("tensors", "key"),
    [
        ({"direction.1": ones(), "bias.1": ones()}, "bias.1"),
        ({"direction.x": ones()}, "direction.x"),
        ({"direction.01": ones()}, "direction.01"),
        ({"direction.1": ones(), "direction.2": np.ones((2, HIDDEN), dtype=np.float32)}, "direction.2"),
        ({"direction.1": ones(), "direction.2": ones(HIDDEN + 2)}, "direction.2"),
        ({"direction.4": np.array([0, np.nan, 0, 0, 0, 0], dtype=np.float32)}, "direction.4"),
        ({"direction.4": np.array([0, 0, 0, np.inf, 0, 0], dtype=np.float32)}, "direction.4"),
        ({"direction.4": ones(dtype=np.int32)}, "direction.4"),
    ],
)
def test_gguf_bad_tensor(tmp_path, tensors, key):
    path = write_gguf(tmp_path / "v.gguf", tensors)
    with pytest.raises(VectorFileError) as err:
        load_gguf(path)
    assert err.value.key == key and err.value.path == str(path)


def test_gguf_not_a_control_vector(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", {"direction.1": ones()}, arch="llama")
    with pytest.raises(VectorFileError, match="not a control vector") as err:
        load_gguf(path)
    assert err.value.key == "general.architecture"


def test_gguf_without_tensors(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", {})
    with pytest.raises(VectorFileError, match="no direction"):
        load_gguf(path)


def test_gguf_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(VectorFileError, match="magic"):
        load_gguf(bad)
    good = write_gguf(tmp_path / "good.gguf", {"direction.1": ones()})
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(VectorFileError, match="GGUF"):
        load_gguf(truncated)
    with pytest.raises(VectorFileError, match="no such"):
        load_gguf(tmp_path / "missing.gguf")


def test_gguf_export_needs_hint_and_absolute_layers(tmp_path):
    with pytest.raises(VectorFileError) as err:
        save_gguf(make(), tmp_path / "v.gguf", model_hint="")
    assert err.value.key == "controlvector.model_hint"
    with pytest.raises(VectorFileError) as err:
        save_gguf(SteeringVector.from_tensors({-2: [1.0]}), tmp_path / "v.gguf", model_hint="llama")
    assert err.value.key == "direction.-2"
    assert list(tmp_path.iterdir()) == []


# ================================================================ dispatch


def test_dispatch_by_suffix(tmp_path):
    v = make(model="m", provenance={"k": "v"})
    save_vector(v, tmp_path / "v.safetensors")
    save_vector(v, tmp_path / "v.GGUF", model_hint="llama")
    assert load_vector(tmp_path / "v.safetensors") == v
    g = load_vector(str(tmp_path / "v.GGUF"))
    assert g.sha256 == v.sha256 and g.provenance == {"gguf_model_hint": "llama"}


def test_dispatch_by_magic_bytes(tmp_path):
    v = make()
    save_vector(v, tmp_path / "a.safetensors")
    save_vector(v, tmp_path / "b.gguf", model_hint="llama")
    (tmp_path / "a.safetensors").rename(tmp_path / "a.bin")
    (tmp_path / "b.gguf").rename(tmp_path / "b")
    assert load_vector(tmp_path / "a.bin").sha256 == v.sha256
    assert load_vector(tmp_path / "b").provenance == {"gguf_model_hint": "llama"}
    (tmp_path / "c.pt").write_bytes(b"PK\x03\x04 not a vector")
    with pytest.raises(VectorFileError, match="unknown vector file format"):
        load_vector(tmp_path / "c.pt")
    with pytest.raises(VectorFileError):
        load_vector(tmp_path / "missing.bin")


def test_gguf_reexport_reuses_imported_hint(tmp_path):
    path = write_gguf(tmp_path / "in.gguf", {"direction.3": ones()}, hint="gemma2")
    v = load_vector(path)
    save_vector(v, tmp_path / "out.gguf")
    assert load_vector(tmp_path / "out.gguf").provenance == {"gguf_model_hint": "gemma2"}


def test_save_vector_errors(tmp_path):
    v = make()
    with pytest.raises(VectorFileError, match="suffix"):
        save_vector(v, tmp_path / "v.pt")
    with pytest.raises(VectorFileError) as err:
        save_vector(v, tmp_path / "v.gguf")
    assert err.value.key == "controlvector.model_hint"
    with pytest.raises(VectorFileError, match="gguf"):
        save_vector(v, tmp_path / "v.safetensors", model_hint="llama")
    assert list(tmp_path.iterdir()) == []
