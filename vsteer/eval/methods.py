"""Steering methods for the evaluation: (method, concept, scale) -> steering spec.

A method is registered by name; ``get_method(name)`` builds it. Every method has a
``prepare(llm, concept)`` step (compute and store its vectors, once per concept) and a
``spec(prepared, scale)`` step (the spec for one scale; scale 0 is always the unsteered model and
gives ``None``). Scales are in each method's own units, so each method has its own default sweep.

Built in:

- ``caa``: mean-difference (CAA as most users mean it) of the concept's positive and negative
  texts, mean-pooled, read inside the engine (``llm.capture``) at the output of a middle layer
  (default 10 of 30), normalised to unit length; ``add`` of ``scale`` x the unit vector at every
  position of that layer (the SAE-TS protocol steers every position). On SmolLM2-135M the
  residual norm there is ~130-180 per token, hence the default sweep up to 120.
- ``actadd``: ActAdd's per-position vector ``h(concept word) - h(neutral word)`` (Turner et al.;
  the concept's ``actadd`` pair, by default the capitalised concept word vs " ") at layer 5
  (= block 6, the paper's README example); ``scale`` is ActAdd's coefficient c.
- ``sara``: op ``sara`` with the concept's positive texts as ``attract`` and its negative texts
  as ``repel`` at layer 6; ``scale`` is SARA's c in ``A' = A * (1 + c r)`` (r is computed from
  the steered prompt, 2 tokens for "I think"). On the default model SARA moves topics little at
  any layer tried (3, 6, 9, 12, 15).

SAE-based methods, ``sae`` (SAE feature steering), ``sae-ts`` (SAE-targeted steering) and ``sas``,
are in ``vsteer.eval.sae_methods``, which registers them here (the package ``vsteer.eval``
imports it, so they are registered whenever any ``vsteer.eval`` module is imported);
other methods can be added with ``register_method``.

Asking for a method that is not registered raises ``MethodUnavailableError`` listing the
available ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from vsteer._errors import VsteerError
from vsteer.eval.concepts import Concept


class MethodUnavailableError(VsteerError, KeyError):
    """The requested steering method is not registered."""

    def __str__(self) -> str:  # KeyError would print the repr
        return str(self.args[0]) if self.args else ""


class SteeringMethod(ABC):
    """One steering method: vectors per concept, then a spec per scale."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: The method's default scale sweep, in its own units (0 = unsteered).
    default_scales: ClassVar[tuple[float, ...]] = ()

    @abstractmethod
    def prepare(self, llm: Any, concept: Concept) -> Any:
        """Compute (and store in ``llm.store``) what the spec needs for ``concept``."""

    @abstractmethod
    def spec_for(self, prepared: Any, scale: float) -> dict:
        """The steering spec at a non-zero ``scale``."""

    def spec(self, prepared: Any, scale: float) -> dict | None:
        """The steering spec at ``scale``; ``None`` (unsteered) at scale 0."""
        return None if float(scale) == 0.0 else self.spec_for(prepared, float(scale))

    def describe(self) -> dict[str, Any]:
        """Settings recorded with every result."""
        return {"name": self.name}


class CaaMethod(SteeringMethod):
    """Mean-difference (CAA) of the concept's contrast texts, unit norm, added at one layer."""

    name = "caa"
    description = "mean-difference of positive vs negative texts (mean-pooled), unit norm, add x scale at every position"
    default_scales = (0.0, 24.0, 48.0, 72.0, 96.0, 120.0)

    def __init__(self, layer: int = 10, *, pooling: str = "mean", positions: str = "all") -> None:
        self.layer, self.pooling, self.positions = int(layer), pooling, positions

    def prepare(self, llm: Any, concept: Concept) -> str:
        from vsteer.methods import mean_difference

        v = mean_difference(llm, list(concept.positive), list(concept.negative), [self.layer],
                            pooling=self.pooling, model=llm.model_shape.name).normalized()
        return llm.store.put(v)

    def spec_for(self, prepared: str, scale: float) -> dict:
        return {"interventions": [{"op": "add", "vector": prepared, "layers": [self.layer], "scale": scale,
                                   "positions": self.positions}]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "pooling": self.pooling, "positions": self.positions,
                "unit": "scale x unit vector"}


class ActAddMethod(SteeringMethod):
    """ActAdd: per-position ``h(concept word) - h(neutral word)``, coefficient = scale."""

    name = "actadd"
    description = "ActAdd per-position vector (concept word vs neutral word), front-aligned on the prompt, c = scale"
    default_scales = (0.0, 2.0, 4.0, 6.0, 8.0)

    def __init__(self, layer: int = 5) -> None:
        self.layer = int(layer)

    def prepare(self, llm: Any, concept: Concept) -> str:
        from vsteer.methods import actadd_vector

        v = actadd_vector(llm, concept.actadd_positive, concept.actadd_negative, self.layer,
                          coefficient=1.0, model=llm.model_shape.name)
        return llm.store.put(v)

    def spec_for(self, prepared: str, scale: float) -> dict:
        return {"interventions": [{"op": "add", "vector": prepared, "layers": [self.layer], "scale": scale}]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "block": self.layer + 1, "unit": "ActAdd coefficient c"}


class SaraMethod(SteeringMethod):
    """SARA with the concept's positive texts as attract and its negative texts as repel."""

    name = "sara"
    description = "SARA: attract = positive texts, repel = negative texts; c = scale"
    default_scales = (0.0, 0.5, 1.0, 2.0, 3.0)

    def __init__(self, layer: int = 6, *, positions: str = "all") -> None:
        self.layer, self.positions = int(layer), positions

    def prepare(self, llm: Any, concept: Concept) -> tuple[str, str]:
        return " ".join(concept.positive), " ".join(concept.negative)

    def spec_for(self, prepared: tuple[str, str], scale: float) -> dict:
        attract, repel = prepared
        return {"interventions": [{"op": "sara", "attract": attract, "repel": repel, "layers": [self.layer],
                                   "scale": scale, "positions": self.positions}]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "positions": self.positions, "unit": "SARA c"}


MethodFactory = Callable[..., SteeringMethod]
_REGISTRY: dict[str, MethodFactory] = {}


def register_method(name: str, factory: MethodFactory, *, overwrite: bool = False) -> None:
    """Make ``factory(**options)`` available as method ``name`` (``get_method``, ``run_eval``, CLI)."""
    key = name.strip().lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"steering method {key!r} is already registered (pass overwrite=True)")
    _REGISTRY[key] = factory


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def _factory(name: str) -> MethodFactory:
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise MethodUnavailableError(
            f"steering method {name!r} is not available; available methods: {', '.join(available_methods())} "
            "(register others with vsteer.eval.methods.register_method)")
    return _REGISTRY[key]


def method_summary(name: str) -> tuple[str, tuple[float, ...]]:
    """A registered method's description and default sweep, without building it (some methods
    need options, e.g. ``sae-ts`` its approximator)."""
    factory = _factory(name)
    return getattr(factory, "description", ""), tuple(getattr(factory, "default_scales", ()))


def get_method(name: str | SteeringMethod, **options: Any) -> SteeringMethod:
    """Build the method called ``name`` (an instance is returned as it is).

    Raises:
        MethodUnavailableError: ``name`` is not registered (the message lists those that are).
    """
    if isinstance(name, SteeringMethod):
        return name
    return _factory(name)(**options)


def build_spec(llm: Any, method: str | SteeringMethod, concept: Concept, scale: float) -> dict | None:
    """The spec of one (method, concept, scale), preparing the method's vectors on the way."""
    m = get_method(method)
    return m.spec(m.prepare(llm, concept), scale)


register_method("caa", CaaMethod)
register_method("actadd", ActAddMethod)
register_method("sara", SaraMethod)
