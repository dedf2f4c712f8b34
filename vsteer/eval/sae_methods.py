"""SAE-based methods for the evaluation: SAE feature steering (``sae``) and SAS (``sas``).

- ``sae``: the SAE feature whose mean activation differs most between the concept's positive and
  negative texts (codes read inside the engine at the SAE's layer, position 0 left out); its
  decoder row is added at every position (``"vector": "sae:<sae>/<feature>"``), scale x the row.
- ``sas``: a SAS vector (Bayat et al., Algorithm 1) from the concept's positive/negative texts as
  contrastive completions of an empty prompt, ``tau`` 0.5 by default (the concept sets are small);
  op ``sas`` with lambda = scale. The engine must load the SAE (``vsteer.LLM(saes=[...])``).

Both default to the default model's own SAE, ``smollm2-l15-4k`` (``vsteer sae train``).
"""

from __future__ import annotations

from typing import Any

import torch

from vsteer._errors import SpecError
from vsteer.eval.concepts import Concept
from vsteer.eval.methods import SteeringMethod, register_method

DEFAULT_SAE = "smollm2-l15-4k"


def _sae(llm: Any, name: str) -> Any:
    if name in getattr(llm, "saes", {}):
        return llm.saes[name]
    return llm.sae_store.get(name)


class SaeFeatureMethod(SteeringMethod):
    """Add the decoder row of the SAE feature that best separates the concept's texts."""

    name = "sae"
    description = "SAE feature steering: decoder row of the feature most active on positive vs negative texts"
    # decoder rows are unit norm in trained SAEs; the residual norm at a middle layer of SmolLM2 is ~150
    default_scales = (0.0, 24.0, 48.0, 96.0, 144.0)

    def __init__(self, sae: str = DEFAULT_SAE) -> None:
        self.sae = sae

    def prepare(self, llm: Any, concept: Concept) -> int:
        sae = _sae(llm, self.sae)
        texts = list(concept.positive) + list(concept.negative)
        acts = llm.capture(texts, [sae.layer])
        with torch.no_grad():
            means = torch.stack([sae.encode(a[sae.layer][1:].float()).mean(0) for a in acts])
        diff = means[: len(concept.positive)].mean(0) - means[len(concept.positive):].mean(0)
        return int(diff.argmax())

    def spec_for(self, prepared: int, scale: float) -> dict:
        return {"interventions": [{"op": "add", "vector": f"sae:{self.sae}/{prepared}", "scale": scale}]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sae": self.sae, "unit": "scale x decoder row"}


class SasMethod(SteeringMethod):
    """SAS from the concept's positive vs negative texts."""

    name = "sas"
    description = "SAS (sparse SAE-space steering, error term kept): lambda = scale"
    default_scales = (0.0, 1.0, 2.0, 4.0, 8.0)

    def __init__(self, sae: str = DEFAULT_SAE, *, tau: float = 0.5) -> None:
        self.sae, self.tau = sae, float(tau)

    def prepare(self, llm: Any, concept: Concept) -> str:
        from vsteer.methods.sas import ContrastPair, sas_vector

        if self.sae not in getattr(llm, "saes", {}):
            raise SpecError(f"the sas method needs the engine to load SAE {self.sae!r} (vsteer.LLM(saes=[...]))", field="saes")
        pairs = [ContrastPair("", p, n) for p, n in zip(concept.positive, concept.negative)]
        v = sas_vector(llm, llm.saes[self.sae], pairs, tau=self.tau, sae_name=self.sae, model=llm.model_shape.name)
        return llm.store.put(v)

    def spec_for(self, prepared: str, scale: float) -> dict:
        return {"interventions": [{"op": "sas", "vector": prepared, "sae": self.sae, "scale": scale}]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sae": self.sae, "tau": self.tau, "unit": "SAS lambda"}


register_method("sae", SaeFeatureMethod)
register_method("sas", SasMethod)
