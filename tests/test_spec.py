"""The steering spec (wire format): accepted forms and errors naming the field."""

from __future__ import annotations

import pytest

from vsteer import SpecError, SteeringSpec, parse_spec


def test_accepted_forms():
    item = {"op": "add", "vector": "love", "layers": [10], "scale": 4.0}
    a = parse_spec({"interventions": [item]})
    assert parse_spec([item]) == a
    assert parse_spec('{"interventions": [{"op": "add", "vector": "love", "layers": [10], "scale": 4.0}]}') == a
    assert parse_spec(a) is a
    assert parse_spec(None) is None and parse_spec("null") is None
    assert a.interventions[0].positions == "all" and a.interventions[0].normalize is False
    ranged = parse_spec([{"op": "ablate", "vector": "x", "positions": [3, 7]}])
    assert ranged.interventions[0].positions == (3, 7)


@pytest.mark.parametrize(
    "value, field, words",
    [
        ("{", "steering", "malformed JSON"),
        (42, "steering", "expected an object"),
        ({"interventions": []}, "interventions", "at least 1"),
        ({"interventions": [{"op": "add"}]}, "interventions.0.vector", "Field required"),
        ([{"op": "add", "vector": "v", "layers": []}], "interventions.0.layers", "empty"),
        ([{"op": "add", "vector": "v", "layers": [1, 1]}], "interventions.0.layers", "duplicates"),
        ([{"op": "add", "vector": "v", "positions": "middle"}], "interventions.0.positions", "Input should be"),
        ([{"op": "add", "vector": "v", "scale": float("nan")}], "interventions.0.scale", "finite"),
        ([{"op": "ablate", "vector": "v", "scale": 2.0}], "interventions.0.scale", "Extra inputs"),
        ([{"op": "explode", "vector": "v"}], "interventions.0", "unknown op 'explode'"),
        ({"interventions": [], "extra": 1}, "interventions", "at least 1"),
    ],
)
def test_errors_name_the_field(value, field, words):
    with pytest.raises(SpecError) as info:
        parse_spec(value)
    assert info.value.field == field
    assert words in str(info.value)


def test_scale_bound():
    spec = SteeringSpec.model_validate({"interventions": [{"op": "add", "vector": "v", "scale": 5e4}]})
    with pytest.raises(SpecError, match="exceeds the bound"):
        spec.check_scales()
    spec.check_scales(max_abs_scale=1e5)
