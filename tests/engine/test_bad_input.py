"""Bad steering input is refused with an error naming the field; the engine keeps serving."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from vllm import SamplingParams

from vsteer import SpecError, SteeringVector, save_vector

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def _add(vector, layers=(10,), **kw):
    return {"interventions": [{"op": "add", "vector": vector, "layers": list(layers), **kw}]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-vectors")
    small = SteeringVector.from_tensors({10: torch.ones(64)})
    save_vector(small, root / "hidden64.safetensors")
    save_file({"layer.10": torch.full((576,), float("nan"))}, str(root / "nan.safetensors"))
    (root / "garbage.safetensors").write_bytes(b"not a safetensors file")
    return root


CASES = {
    "unknown vector": (lambda f, d: _add("no-such-vector"), "interventions.0.vector", "unknown vector"),
    "wrong hidden size": (lambda f, d: _add(str(f / "hidden64.safetensors")), "interventions.0.vector", "hidden size 64"),
    "layer out of range": (lambda f, d: _add(d, layers=[30]), "interventions.0.layers", "out of range"),
    "negative layer": (lambda f, d: _add(d, layers=[-1]), "interventions.0.layers", "out of range"),
    "NaN in file": (lambda f, d: _add(str(f / "nan.safetensors")), "interventions.0.vector", "NaN"),
    "NaN inline": (lambda f, d: _add([float("nan")] * 576), "interventions.0.vector", "NaN"),
    "Inf scale": (lambda f, d: _add(d, scale=float("inf")), "interventions.0.scale", "finite"),
    "absurd scale": (lambda f, d: _add(d, scale=1e9), "interventions.0.scale", "exceeds"),
    "malformed JSON": (lambda f, d: '{"interventions": [', "steering", "malformed JSON"),
    "unknown op": (lambda f, d: {"interventions": [{"op": "explode", "vector": d}]}, "interventions.0", "unknown op"),
    "misspelt field": (lambda f, d: _add(d, scael=2.0), "interventions.0.scael", "Extra inputs"),
    "bad positions": (lambda f, d: _add(d, positions=[5, 2]), "interventions.0.positions", "start < end"),
    "corrupt file": (lambda f, d: _add(str(f / "garbage.safetensors")), "interventions.0.vector", "cannot load"),
    "inline without layers": (lambda f, d: {"interventions": [{"op": "add", "vector": [0.0] * 576}]}, "interventions.0.layers", "explicit"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_spec_is_refused_and_engine_keeps_serving(name, eager_llm, directions, files):
    make, field, words = CASES[name]
    good = _add(directions["love"].sha256, scale=8.0)
    before = eager_llm.generate(["I think that"], GREEDY, steering=good)[0].outputs[0].token_ids
    with pytest.raises(SpecError) as info:
        eager_llm.generate(["I think that", "Hello"], GREEDY, steering=make(files, directions["love"].sha256))
    assert info.value.field == field, str(info.value)
    assert words in str(info.value)
    after = eager_llm.generate(["I think that"], GREEDY, steering=good)[0].outputs[0].token_ids
    assert after == before


def test_per_prompt_error_names_the_prompt(eager_llm, directions):
    good = _add(directions["love"].sha256)
    with pytest.raises(SpecError) as info:
        eager_llm.generate(["a", "b"], GREEDY, steering=[good, _add("missing")])
    assert info.value.field == "steering.1.interventions.0.vector"


def test_too_many_ablations_for_the_bank(eager_llm, directions):
    d = directions["love"].sha256
    spec = {"interventions": [{"op": "ablate", "vector": d, "layers": [5]}, {"op": "ablate", "vector": directions["wedding"].sha256, "layers": [5]}]}
    with pytest.raises(SpecError, match="max_ablation_rank=1"):
        eager_llm.generate(["a"], GREEDY, steering=spec)


def test_capture_of_a_layer_without_buffer_is_refused(eager_llm):
    with pytest.raises(SpecError, match="out of range"):
        eager_llm.capture(["a"], [31])
