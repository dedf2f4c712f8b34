"""The mixed batch the Model Runner V2 checks run (tests/engine/test_runner_v2.py,
benchmarks/v2_compiled.py): plain, additive, scheduled, ablating with a generated-only add, gated on
and off, prompt-only and SAS requests, one of them with a long prompt."""

from __future__ import annotations

import torch

LONG = "The old lighthouse keeper climbed the stairs every evening to light the lamp, and the ships " * 9
PROMPTS = ["I think that", "I think that", "Once upon a time", "My favourite food is", "The weather today is",
           "The weather today is", LONG, "Tell me a story about"]


def unit(seed: int, norm: float) -> list[float]:
    """A random direction of the default model's width (576) with the given norm, as a list."""
    v = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm() * norm).tolist()


def specs(sas: str | None = None) -> list[dict | None]:
    """One spec per prompt of :data:`PROMPTS` (None: plain). ``sas``: the sha256 of an SAS vector for
    the SAE "test-relu", for the last request (plain without one)."""
    v, w, c = unit(0, 60.0), unit(1, 1.0), unit(2, 1.0)
    return [
        None,
        {"interventions": [{"op": "add", "vector": v, "layers": [10], "scale": 1.0}]},
        {"interventions": [{"op": "add", "vector": v, "layers": [5, 15], "scale": 0.8,
                            "schedule": {"kind": "linear", "from": 1.0, "to": 0.0, "over": 4}}]},
        {"interventions": [{"op": "ablate", "vector": w, "layers": [8, 9, 10]},
                           {"op": "add", "vector": v, "layers": [12], "scale": 0.5, "positions": "generated"}]},
        {"interventions": [{"op": "add", "vector": v, "layers": [14], "scale": 1.0,
                            "when": {"vector": c, "layer": 6, "threshold": -1.0, "compare": "above"}}]},
        {"interventions": [{"op": "add", "vector": v, "layers": [14], "scale": 1.0,
                            "when": {"vector": c, "layer": 6, "threshold": 1.0, "compare": "above"}}]},
        {"interventions": [{"op": "add", "vector": v, "layers": [10], "scale": 0.7, "positions": "prompt"}]},
        {"interventions": [{"op": "sas", "vector": sas, "sae": "test-relu", "scale": 1.0}]} if sas else None,
    ]
