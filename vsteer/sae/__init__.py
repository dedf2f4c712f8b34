"""Sparse autoencoders: models, file formats, a small trainer (DESIGN.md section 5)."""

from vsteer.sae.formats import (
    check_sae_for_model,
    load_gemma_scope,
    load_sae,
    load_saelens,
    save_sae,
)
from vsteer.sae.model import SaeConfig, SparseAutoencoder
from vsteer.sae.store import SaeStore, default_sae_store

__all__ = [
    "SaeConfig",
    "SaeStore",
    "SparseAutoencoder",
    "check_sae_for_model",
    "default_sae_store",
    "load_gemma_scope",
    "load_sae",
    "load_saelens",
    "save_sae",
]
