"""SteeringVector: construction, hashing, arithmetic identities and transforms."""

from __future__ import annotations

import ast
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import vsteer.vectors
from vsteer.vectors import SteeringVector

HIDDEN = 8


def make(layers=(2, 5), *, seed=0, model="SmolLM2-135M-Instruct", **kwargs) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return SteeringVector.from_tensors(
        {layer: torch.randn(HIDDEN, generator=gen) for layer in layers}, model=model, **kwargs
    )


# ---------------------------------------------------------------- public surface


def test_public_names():
    assert sorted(vsteer.vectors.__all__) == sorted(
        [
            "SteeringVector",
            "VectorStore",
            "load_gguf",
            "load_safetensors",
            "load_vector",
            "save_gguf",
            "save_safetensors",
            "save_vector",
        ]
    )
    for name in vsteer.vectors.__all__:
        assert getattr(vsteer.vectors, name) is not None


def test_imports_without_vllm():
    # Static check (a subprocess import would cost seconds): no module of vsteer.vectors
    # imports vllm, so the package works with plain torch (DESIGN.md section 1).
    package = Path(vsteer.vectors.__file__).parent
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(name.split(".")[0] == "vllm" for name in names), source.name


# ---------------------------------------------------------------- construction


def test_from_tensors_infers_hidden_size_sorts_and_converts():
    v = SteeringVector.from_tensors(
        {7: np.arange(3, dtype=np.float64), 1: [1, 2, 3], 4: torch.ones(3, dtype=torch.float16)},
        model="m",
        method="caa",
        provenance={"prompts": ["a", "b"]},
    )
    assert v.hidden_size == 3
    assert v.layer_indices == [1, 4, 7] == list(v.layers)
    assert len(v) == 3
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in v.layers.values())
    assert v.model == "m" and v.method == "caa" and v.provenance == {"prompts": ["a", "b"]}
    assert torch.equal(v.layers[7], torch.tensor([0.0, 1.0, 2.0]))


def test_defaults():
    v = SteeringVector({0: torch.zeros(2)}, hidden_size=2)
    assert v.model is None and v.method == "custom" and v.provenance == {}


def test_inputs_are_copied():
    source = torch.ones(HIDDEN)
    v = SteeringVector.from_tensors({3: source})
    sha = v.sha256
    source.add_(1.0)
    assert torch.equal(v.layers[3], torch.ones(HIDDEN))
    assert v.sha256 == sha


@pytest.mark.parametrize(
    ("layers", "hidden", "match"),
    [
        ({}, 4, "at least one layer"),
        ({3: torch.zeros(5)}, 4, "layer 3"),
        ({3: torch.zeros(4), 9: torch.zeros(2, 2)}, 4, "layer 9"),
        ({2: torch.tensor([0.0, float("nan"), 0.0, 0.0])}, 4, "layer 2: contains NaN"),
        ({6: torch.tensor([0.0, float("inf"), 0.0, 0.0])}, 4, "layer 6: contains NaN or Inf"),
        ({"1": torch.zeros(4)}, 4, "layer key"),
        ({True: torch.zeros(4)}, 4, "layer key"),
        ({1: torch.zeros(4)}, 0, "hidden_size"),
    ],
)
def test_constructor_rejects(layers, hidden, match):
    with pytest.raises(ValueError, match=match):
        SteeringVector(layers, hidden_size=hidden)


def test_constructor_rejects_bad_metadata():
    with pytest.raises(ValueError, match="provenance"):
        SteeringVector({0: torch.zeros(2)}, 2, provenance={"x": object()})
    with pytest.raises(ValueError, match="method"):
        SteeringVector({0: torch.zeros(2)}, 2, method="")
    with pytest.raises(ValueError, match="model"):
        SteeringVector({0: torch.zeros(2)}, 2, model=3)  # type: ignore[arg-type]


def test_immutable():
    v = make()
    with pytest.raises(AttributeError):
        v.model = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        v.layers[2] = torch.zeros(HIDDEN)  # type: ignore[index]
    v.provenance["x"] = 1
    assert "x" not in v.provenance
    assert v.replace(model="other").model == "other" and v.model == "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- hashing and equality


def test_sha256_is_the_documented_preimage():
    v = SteeringVector.from_tensors({4: [1.0, -2.0], 1: [0.5, 0.25]})
    expected = hashlib.sha256(
        struct.pack("<q", 2)
        + struct.pack("<q", 1)
        + struct.pack("<2f", 0.5, 0.25)
        + struct.pack("<q", 4)
        + struct.pack("<2f", 1.0, -2.0)
    ).hexdigest()
    assert v.sha256 == expected


def test_sha256_ignores_metadata_and_key_order():
    a = make(method="caa", provenance={"seed": 1})
    b = SteeringVector.from_tensors(dict(reversed(list(a.layers.items()))), model=None, method="pca")
    assert a.sha256 == b.sha256
    assert a != b  # same numbers, different model
    assert a == a.replace(method="other", provenance={"different": True})
    assert hash(a) == hash(a.replace(method="x"))


def test_sha256_changes_with_numbers_and_layers():
    a = make()
    changed = dict(a.layers)
    changed[2] = changed[2].clone()
    changed[2][0] += 1e-6
    assert SteeringVector.from_tensors(changed).sha256 != a.sha256
    moved = SteeringVector.from_tensors({3: a.layers[2], 5: a.layers[5]})
    assert moved.sha256 != a.sha256
    assert make(seed=1).sha256 != a.sha256


def test_sha256_ignores_device_but_not_precision():
    v = make()
    assert v.to(device="cpu").sha256 == v.sha256
    assert v.to(dtype=torch.float64).sha256 == v.sha256  # float64 of float32 values is exact
    assert v.to(dtype=torch.bfloat16).sha256 != v.sha256


def test_pickle_round_trip():
    v = make(provenance={"p": [1, 2]})
    w = pickle.loads(pickle.dumps(v))
    assert w == v and w.provenance == v.provenance and w.method == v.method


# ---------------------------------------------------------------- arithmetic


def test_v_minus_v_is_zero():
    v = make()
    zero = v - v
    assert zero.layer_indices == v.layer_indices
    assert all(torch.count_nonzero(t) == 0 for t in zero.layers.values())


def test_scalar_identities():
    v = make()
    assert 2 * v == v + v
    assert v * 2 == 2 * v
    assert v * 2.0 == v * np.float32(2.0) == v * torch.tensor(2.0)
    assert (v * 4) / 4 == v
    assert -v == -1 * v
    assert v + (-v) == v - v
    assert -(-v) == v


def test_layer_union_treats_missing_layers_as_zero():
    a = SteeringVector.from_tensors({1: [1.0, 2.0], 3: [3.0, 4.0]}, model="m")
    b = SteeringVector.from_tensors({3: [1.0, 1.0], 7: [5.0, 6.0]})
    total = a + b
    assert total.layer_indices == [1, 3, 7]
    assert total.layers[1].tolist() == [1.0, 2.0]
    assert total.layers[3].tolist() == [4.0, 5.0]
    assert total.layers[7].tolist() == [5.0, 6.0]
    assert total.model == "m"
    diff = a - b
    assert diff.layers[7].tolist() == [-5.0, -6.0]
    assert diff.layers[3].tolist() == [2.0, 3.0]
    # the inputs are unchanged
    assert a.layer_indices == [1, 3] and b.layers[7].tolist() == [5.0, 6.0]


def test_arithmetic_records_provenance():
    a, b = make(seed=0), make(seed=1)
    assert (a + b).provenance == {"op": "add", "inputs": [a.sha256, b.sha256]}
    assert (a - b).provenance == {"op": "sub", "inputs": [a.sha256, b.sha256]}
    assert (-a).provenance == {"op": "neg", "inputs": [a.sha256]}
    assert (a * 3).provenance == {"op": "mul", "inputs": [a.sha256], "scale": 3.0}
    assert (a / 2).provenance == {"op": "div", "inputs": [a.sha256], "divisor": 2.0}


def test_arithmetic_rejects_mismatches():
    a = make()
    other_size = SteeringVector.from_tensors({2: torch.zeros(HIDDEN + 1)})
    with pytest.raises(ValueError, match="hidden sizes"):
        a + other_size
    with pytest.raises(ValueError, match="different models"):
        a - make(model="gpt2")
    with pytest.raises(TypeError):
        a + 1  # type: ignore[operator]
    with pytest.raises(TypeError):
        a * "2"  # type: ignore[operator]
    with pytest.raises(ZeroDivisionError):
        a / 0
    with pytest.raises(ValueError, match="finite"):
        a * float("inf")
    with pytest.raises(ValueError, match="layer 2"):
        SteeringVector.from_tensors({2: [3e38]}) * 10


# ---------------------------------------------------------------- transforms


def test_to_returns_new_vector():
    v = make()
    half = v.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and v.dtype == torch.float32
    assert half.model == v.model and half.provenance == v.provenance
    assert v.to().device.type == "cpu"
    with pytest.raises(ValueError):
        v.to(dtype=torch.int32)


def test_norms_and_normalized():
    v = SteeringVector.from_tensors({0: [3.0, 4.0], 2: [0.0, -2.0]})
    assert v.norms() == {0: 5.0, 2: 2.0}
    unit = v.normalized()
    assert unit.norms() == pytest.approx({0: 1.0, 2: 1.0})
    assert unit.layers[0].tolist() == pytest.approx([0.6, 0.8])
    assert unit.provenance == {"op": "normalize", "inputs": [v.sha256]}
    with pytest.raises(ValueError, match="layer 0"):
        (v - v).normalized()


def test_normalize_layers():
    v = SteeringVector.from_tensors({-1: [1.0], -3: [2.0], 4: [3.0]})
    assert v.layer_indices == [-3, -1, 4]
    n = v.normalize_layers(30)
    assert n.layer_indices == [4, 27, 29]
    assert n.layers[29].tolist() == [1.0]
    with pytest.raises(ValueError, match="out of range"):
        v.normalize_layers(4)
    with pytest.raises(ValueError, match="out of range"):
        SteeringVector.from_tensors({-5: [1.0]}).normalize_layers(4)
    with pytest.raises(ValueError, match="same layer"):
        SteeringVector.from_tensors({-1: [1.0], 3: [2.0]}).normalize_layers(4)


def test_repr_is_short():
    v = SteeringVector.from_tensors({layer: torch.zeros(4) for layer in range(100)}, model="m")
    text = repr(v)
    assert len(text) < 200
    assert "hidden_size=4" in text and v.sha256[:12] in text and "100 layers" in text
