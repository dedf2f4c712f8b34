"""Computing steering vectors from activations captured inside the engine."""

from vsteer.methods.actadd import actadd_vector
from vsteer.methods.affine import affine_vector, loreft_vector, split_affine
from vsteer.methods.caa import ABItem, caa_vector, mean_difference
from vsteer.methods.condition import ConditionPoint, cast_similarity, condition_vector, search_condition
from vsteer.methods.pca import pca_direction
from vsteer.methods.pca_extract import pca_vector
from vsteer.methods.sara import SaraSet, apply_sara, reduce, sara_factor, sara_r

__all__ = [
    "ABItem",
    "ConditionPoint",
    "cast_similarity",
    "condition_vector",
    "search_condition",
    "SaraSet",
    "actadd_vector",
    "affine_vector",
    "loreft_vector",
    "split_affine",
    "apply_sara",
    "caa_vector",
    "mean_difference",
    "pca_direction",
    "pca_vector",
    "reduce",
    "sara_factor",
    "sara_r",
]
