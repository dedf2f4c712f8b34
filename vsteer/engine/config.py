"""Engine-side steering settings, carried in vLLM's ``additional_config["vsteer"]``.

They change the traced graph (which layers are wrapped, bank width, capture buffers), and
``additional_config`` is part of vLLM's compile-cache hash, so a cached unsteered artifact is never
reused for a steered engine.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

ADDITIONAL_CONFIG_KEY = "vsteer"
#: The default ``max_slots`` never gives the slot banks more than this (1 GiB).
DEFAULT_MAX_BANK_BYTES = 1 << 30


class SteeringEngineConfig(BaseModel):
    """Settings fixed when the engine is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_slots: int | None = Field(
        default=None,
        ge=1,
        description="Steering slots (distinct folded configs resident at once), slot 0 excluded. "
        "None: vLLM's resolved max_num_seqs, capped so the banks fit max_bank_bytes (see bank_bytes).",
    )
    max_bank_bytes: int = Field(
        default=DEFAULT_MAX_BANK_BYTES,
        ge=1,
        description="Memory the default max_slots may give the slot banks (an explicit max_slots ignores it).",
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
    sae_shapes: dict[str, tuple[int, int]] = Field(
        default_factory=dict,
        description="Name -> (layer, d_sae) of each of ``saes``, so the scheduler can check sas requests "
        "without loading the weights.",
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

    condition_layers: list[int] = Field(
        default_factory=list,
        description="Layers where the engine pools each gated request's prompt for conditional steering "
        "(``when``). Memory: (max_num_seqs + 1) x hidden x 4 x (max_conditions + 2 x condition layers) bytes; "
        "per step, each condition layer pools the step's tokens and evaluates every row's conditions "
        "(compiled engines: every step; eager ones only on steps with gated prompts).",
    )
    max_conditions: int = Field(default=2, ge=1, le=16,
                                description="Conditions (and distinct gates) one request may carry.")
    edge: bool = Field(default=False,
                       description="The engine serves behind vsteer's HTTP edge: it accepts steering, tenant tags and "
                       "cache salts only under the edge's seal (vsteer.engine.edge_seal; secret in $VSTEER_EDGE_SECRET).")

    def check_condition_layers(self, num_layers: int) -> None:
        """Refuse condition layers the model does not have or the engine does not wrap.

        Raises:
            SpecError: naming ``condition_layers``.
        """
        from vsteer._errors import SpecError

        wrapped = set(range(num_layers) if self.steerable_layers is None else self.steerable_layers)
        bad = sorted(set(self.condition_layers) - wrapped)
        if bad:
            raise SpecError(f"condition layers {bad} are not steerable layers of this engine (layers 0..{num_layers - 1}"
                            + (f", steerable {sorted(wrapped)})" if self.steerable_layers is not None else ")"),
                            field="condition_layers")

    @classmethod
    def from_vllm(cls, additional_config: Mapping[str, Any] | None) -> "SteeringEngineConfig":
        data = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if data is None:
            from vsteer._errors import EngineError

            raise EngineError(
                "the vsteer worker needs additional_config['vsteer']; build engines with vsteer.LLM, "
                "`vsteer serve`, or stock vLLM with vsteer installed and additional_config={'vsteer': {...}}"
            )
        return cls.model_validate(data)

    def bank_bytes(self, num_slots: int, *, num_layers: int, hidden_size: int) -> int:
        """Bytes of the slot banks for ``num_slots`` slots: the affine bank
        ``layers x (num_slots + 1) x ((2 + 2 x max_ablation_rank) x hidden + 1) x 4`` plus, per SAE,
        ``(num_slots + 1) x d_sae x 4``."""
        layers = len(self.steerable_layers) if self.steerable_layers is not None else num_layers
        affine = layers * (num_slots + 1) * ((2 + 2 * self.max_ablation_rank) * hidden_size + 1) * 4
        return affine + sum((num_slots + 1) * d_sae * 4 for _, d_sae in self.sae_shapes.values())

    def resolved_max_slots(self, vllm_config: Any) -> int:
        """``max_slots``, or by default vLLM's resolved ``max_num_seqs`` capped so
        :meth:`bank_bytes` stays within ``max_bank_bytes`` (at least 1)."""
        if self.max_slots is not None:
            return self.max_slots
        seqs = int(vllm_config.scheduler_config.max_num_seqs)
        hf = vllm_config.model_config.hf_text_config
        shape = {"num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size}
        per_slot = self.bank_bytes(2, **shape) - self.bank_bytes(1, **shape)
        fit = (self.max_bank_bytes - self.bank_bytes(0, **shape)) // max(per_slot, 1)
        return max(1, min(seqs, fit))
