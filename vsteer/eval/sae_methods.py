"""SAE-based methods for the evaluation: SAE feature steering (``sae``), SAE-TS (``sae-ts``) and SAS (``sas``).

- ``sae``: the SAE feature whose mean activation differs most between the concept's positive and
  negative texts (codes read inside the engine at the SAE's layer, position 0 left out); its
  decoder row is added at every position (``"vector": "sae:<sae>/<feature>"``), scale x the row.
- ``sae-ts``: SAE-targeted steering (Chalnev et al., eq. 3) of that same feature: the unit vector
  ``normalize(M_j/|M_j| - lam * Mb/|Mb|)`` from a fitted effect approximator (``vsteer effects
  measure`` then ``vsteer effects fit``; ``benchmarks/sae_ts_approximator.py`` builds one for the
  default SAE), added at every position of the approximator's layer, scale x the unit vector.
- ``sas``: a SAS vector (Bayat et al., Algorithm 1) from the concept's positive/negative texts as
  contrastive completions of an empty prompt, ``tau`` 0.5 by default (the concept sets are small);
  op ``sas`` with lambda = scale. The engine must load the SAE (``vsteer.LLM(saes=[...])``).

All three default to the default model's own SAE, ``smollm2-l15-4k`` (``vsteer sae train``).
"""

from __future__ import annotations

import os
from pathlib import Path
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


def concept_feature(llm: Any, sae: Any, concept: Concept) -> int:
    """The SAE feature whose mean code is highest on the concept's positive texts relative to its
    negative texts (residuals read inside the engine at the SAE's layer; position 0 left out)."""
    texts = list(concept.positive) + list(concept.negative)
    acts = llm.capture(texts, [sae.layer])
    with torch.no_grad():
        means = torch.stack([sae.encode(a[sae.layer][1:].float()).mean(0) for a in acts])
    diff = means[: len(concept.positive)].mean(0) - means[len(concept.positive):].mean(0)
    return int(diff.argmax())


class SaeFeatureMethod(SteeringMethod):
    """Add the decoder row of the SAE feature that best separates the concept's texts."""

    name = "sae"
    description = "SAE feature steering: decoder row of the feature most active on positive vs negative texts"
    # decoder rows are unit norm in trained SAEs; the residual norm at a middle layer of SmolLM2 is ~150
    default_scales = (0.0, 24.0, 48.0, 96.0, 144.0)

    def __init__(self, sae: str = DEFAULT_SAE) -> None:
        self.sae = sae

    def prepare(self, llm: Any, concept: Concept) -> int:
        return concept_feature(llm, _sae(llm, self.sae), concept)

    def spec_for(self, prepared: int, scale: float) -> dict:
        return {"interventions": [{"op": "add", "vector": f"sae:{self.sae}/{prepared}", "scale": scale}]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sae": self.sae, "unit": "scale x decoder row"}


class SaeTsMethod(SteeringMethod):
    """SAE-TS (eq. 3) towards the feature the ``sae`` method would add, from a fitted approximator."""

    name = "sae-ts"
    description = "SAE-TS: eq. 3 targeted vector (effect approximator) for the concept's SAE feature, x scale"
    # unit vectors like the sae method's decoder rows, so the same sweep
    default_scales = (0.0, 24.0, 48.0, 96.0, 144.0)

    def __init__(self, sae: str = DEFAULT_SAE, *, approximator: str | os.PathLike[str] | None = None,
                 lam: float = 1.0) -> None:
        if approximator is None:
            raise SpecError(
                f"the sae-ts method needs an effect approximator fitted with SAE {sae!r}: measure effects "
                "(`vsteer effects measure`), fit them (`vsteer effects fit`) and pass its file "
                "(--approximator; benchmarks/sae_ts_approximator.py builds one for the default SAE)",
                field="approximator")
        from vsteer.effects import EffectApproximator

        path = Path(approximator)
        if not path.is_file():
            raise SpecError(f"no approximator file at {str(path)!r}", field="approximator")
        self.sae, self.lam = sae, float(lam)
        self.approx = EffectApproximator.load(path)
        if self.approx.sae is not None and Path(self.approx.sae).name != sae:
            raise SpecError(f"{str(path)!r} was fitted on effects read by SAE {self.approx.sae!r}, not {sae!r}",
                            field="approximator")

    def prepare(self, llm: Any, concept: Concept) -> str:
        from vsteer.effects import targeted_vector

        sae = _sae(llm, self.sae)
        if (sae.d_in, sae.d_sae, sae.layer) != (self.approx.d_model, self.approx.d_sae, self.approx.layer):
            raise SpecError(
                f"SAE {self.sae!r} (d_in {sae.d_in}, d_sae {sae.d_sae}, layer {sae.layer}) does not match the "
                f"approximator (d_model {self.approx.d_model}, d_sae {self.approx.d_sae}, layer {self.approx.layer})",
                field="approximator")
        feature = concept_feature(llm, sae, concept)
        if float(self.approx.M[:, feature].norm()) == 0.0:
            raise SpecError(
                f"the approximator predicts no effect on feature {feature} (concept {concept.name!r}): none of the "
                "effects it was fitted on moved that feature; measure more vectors, rollouts or tokens",
                field="approximator")
        vector = targeted_vector(self.approx, feature, lam=self.lam)
        return llm.store.put(vector if vector.model else vector.replace(model=llm.model_shape.name))

    def spec_for(self, prepared: str, scale: float) -> dict:
        return {"interventions": [{"op": "add", "vector": prepared, "layers": [self.approx.layer], "scale": scale}]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sae": self.sae, "approximator": self.approx.sha256[:12], "lam": self.lam,
                "layer": self.approx.layer, "unit": "scale x unit vector"}


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
register_method("sae-ts", SaeTsMethod)
