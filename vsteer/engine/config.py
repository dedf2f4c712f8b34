"""Engine-side steering settings, carried in vLLM's ``additional_config["vsteer"]``.

They change the traced graph (which layers are wrapped, bank width, capture buffers), and
``additional_config`` is part of vLLM's compile-cache hash, so a cached unsteered artifact is never
reused for a steered engine.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

ADDITIONAL_CONFIG_KEY = "vsteer"


class SteeringEngineConfig(BaseModel):
    """Settings fixed when the engine is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_slots: int = Field(
        ge=1,
        description="Steering slots (distinct folded configs resident at once), slot 0 excluded. "
        "Bank memory: layers x (max_slots + 1) x ((2 + 2*max_ablation_rank) x hidden + 1) x 4 bytes.",
    )
    max_ablation_rank: int = Field(default=1, ge=0, le=16, description="Ablations per layer per slot.")
    steerable_layers: list[int] | None = Field(
        default=None, description="Decoder layers that are wrapped (None = all)."
    )
    capture_layers: list[int] | None = Field(
        default=None,
        description="Layers with a capture buffer (None = all steerable layers). Memory: "
        "layers x max_num_batched_tokens x hidden x dtype size.",
    )
    store: str = Field(description="Folder of the content-addressed vector store.")
    saes: dict[str, str] = Field(
        default_factory=dict,
        description="SAEs for the sas op: name -> SAE path (any layout vsteer.sae.load_sae reads); "
        "at most one per layer. Memory per SAE: (2 x d_sae x hidden + (max_slots + 1) x d_sae) x 4 bytes.",
    )
    effect_saes: list[str] = Field(
        default_factory=list,
        description="Names among ``saes`` whose layer also sums SAE codes per request for feature-effect "
        "measurement. Memory per SAE: (max_num_seqs + 1) x d_sae x 4 bytes.",
    )
    max_sas_support: int = Field(
        default=1024,
        ge=1,
        description="Features one SAE layer may touch per step (the union of the supports of the "
        "step's sas vectors; ReLU/JumpReLU). Requests that would exceed it wait; a value >= d_sae never binds.",
    )

    @classmethod
    def from_vllm(cls, additional_config: Mapping[str, Any] | None) -> "SteeringEngineConfig":
        data = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if data is None:
            from vsteer._errors import EngineError

            raise EngineError(
                "the vsteer worker needs additional_config['vsteer']; build engines with vsteer.LLM "
                "or `vsteer serve`"
            )
        return cls.model_validate(data)
