"""SAE-targeted steering vectors from an `EffectApproximator` (SAE-TS sec. 4, appendices A and D).

Conventions. The approximator is ``y_hat = x M + b`` with ``M [d_model, d_sae]``, ``b [d_sae]``;
the SAE decoder is ``W_dec [d_sae, d_model]`` whose row ``d_i`` is feature ``i``'s direction.

**eq3** (``targeted_vector``, method ``"sae-ts"``): ``s = M_j/|M_j| - lam * Mb/|Mb|``, then
``s / |s|``. ``M_j = M[:, j]`` is column ``j`` of ``M``, a ``d_model`` vector: the unit direction
maximising the predicted effect on feature ``j`` (``x M_j``). ``Mb = M @ b``, the matrix-vector
product of ``M [d_model, d_sae]`` with ``b [d_sae]``, also a ``d_model`` vector: the direction
whose predicted effect ``x M`` lines up best with the bias (``(xM) . b = x . (M b)``), i.e. that
pushes the same features the bias says any steering pushes. Subtracting it steers away from those
generic effects. This is the reference ``single_step_steer`` (slavachalnev/SAE-TS
``src/sae_ts/baselines/analysis.py``): ``normalize(W @ target) - bias_scale * normalize(W @ b)``,
normalised, with ``W`` our ``M``, ``target`` zero except the chosen features' weights (one-hot for
one feature, so ``W @ target = M_j``) and ``bias_scale = 1``. Several features with weights give
``M @ t`` for the weighted target ``t``, as the reference's ``config['features']`` does.

**pinv** (``pseudoinverse_vector``, method ``"sae-ts-pinv"``): reference ``pinverse_steer`` (same
file) and ``LinearAdapter.compute_optimal_input`` (``src/sae_ts/ft_effects/utils.py``):
``t = target_scale * t/|t|``, ``x = (t - b) @ pinv(M)`` with ``pinv(M) [d_sae, d_model]``: the
minimum-norm ``x`` minimising ``|x M + b - t|``. The reference uses ``x`` unnormalised; we
normalise by default so its scale means what every other unit vector's scale means, and record
the raw norm (``normalize=False`` gives the reference's vector).

**rotation** (``rotation_vector``, method ``"sae-ts-rotation"``; appendix D): paper:
``C = M W_dec``, ``C = U S V^T``, ``R = U V^T``, ``v = normalize(d_i R) - normalize(Mb)``. Shapes:
``C`` is ``[d_model, d_model]``; ``R`` is the orthogonal factor of ``C`` (orthogonal Procrustes:
the rotation taking the decoder rows onto the matching columns of ``M``, ``R d_j ~ M_j``). Read
with ``d_i`` as a ROW vector, ``d_i R`` would apply ``R^T``, the inverse rotation. The reference
(slavachalnev/steering_research ``ft_effects/adapter_analysis.py``: ``analyze_transformations``
solves ``Y ~ R_ref X`` for ``X = normalised M columns``, ``Y = normalised W_dec rows`` transposed,
via ``svd(Y X^T)``, i.e. ``R_ref = polar(C^T) = R^T``; then ``load_rotation_steer`` in SAE-TS
``baselines/analysis.py`` steers with ``R_ref.T @ d_i``) applies ``R^T_ref = R`` to the column
``d_i``: ``v = R d_i``. We follow the code, which maps a decoder direction to its effect-space
counterpart (a test checks ``R d_j = M_j`` for an exact rotation). As in the reference, ``C`` is
built from unit-normalised columns of ``M`` and unit-normalised rows of ``W_dec``; columns/rows of
zero norm are left out, and ``exclude_features`` can hold features out of the fit (the reference
removed the target features to test generalisation). The bias term is
``normalize(M @ b)`` (the reference's ``correction_bias`` file), times ``lam``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from vsteer.effects.approximator import EffectApproximator
from vsteer.vectors import SteeringVector

if TYPE_CHECKING:
    from vsteer.sae.model import SparseAutoencoder

__all__ = ["pseudoinverse_vector", "rotation_matrix", "rotation_vector", "targeted_vector"]

#: One feature id, or weights per feature id.
FeatureTarget = int | Mapping[int, float]


def _weights(feature: FeatureTarget, d_sae: int) -> dict[int, float]:
    if isinstance(feature, Mapping):
        weights = {int(k): float(v) for k, v in feature.items()}
    elif isinstance(feature, bool) or not isinstance(feature, int):
        raise TypeError(f"feature must be an int or a mapping of feature id to weight, got {feature!r}")
    else:
        weights = {int(feature): 1.0}
    if not weights or all(w == 0 for w in weights.values()):
        raise ValueError("need at least one feature with a non-zero weight")
    bad = sorted(f for f in weights if not 0 <= f < d_sae)
    if bad:
        raise ValueError(f"features {bad} are out of range 0..{d_sae - 1}")
    return weights


def _target(weights: Mapping[int, float], d_sae: int) -> torch.Tensor:
    t = torch.zeros(d_sae, dtype=torch.float64)
    for f, w in weights.items():
        t[f] = w
    return t


def _unit(v: torch.Tensor, what: str) -> torch.Tensor:
    norm = v.norm()
    if float(norm) == 0.0 or not bool(torch.isfinite(norm)):
        raise ValueError(f"{what} has zero norm and cannot be normalised")
    return v / norm


def _bias_direction(approx: EffectApproximator) -> tuple[torch.Tensor, float]:
    """``normalize(M @ b)`` and ``|M @ b|``; the zero vector when ``M @ b = 0`` (no bias to remove)."""
    mb = approx.M.double() @ approx.b.double()
    norm = float(mb.norm())
    return (mb / norm if norm > 0 else mb), norm


def _layer(approx: EffectApproximator, layer: int | None) -> int:
    layer = approx.layer if layer is None else layer
    if layer is None:
        raise ValueError("the approximator records no layer; pass layer=")
    return int(layer)


def _vector(
    s: torch.Tensor, approx: EffectApproximator, layer: int | None, method: str, provenance: dict[str, Any]
) -> SteeringVector:
    prov = {"approximator": approx.info(), "sae": approx.sae, **provenance}
    return SteeringVector(
        {_layer(approx, layer): s.to(torch.float32)}, approx.d_model, model=approx.model, method=method, provenance=prov
    )


def _features_record(weights: Mapping[int, float]) -> dict[str, Any]:
    if len(weights) == 1 and next(iter(weights.values())) == 1.0:
        return {"feature": next(iter(weights))}
    return {"features": [[f, w] for f, w in sorted(weights.items())]}


def targeted_vector(
    approx: EffectApproximator, feature: FeatureTarget, *, lam: float = 1.0, layer: int | None = None
) -> SteeringVector:
    """SAE-TS eq. 3: ``normalize(M_j/|M_j| - lam * Mb/|Mb|)`` at the approximator's layer.

    Args:
        approx: The fitted approximator.
        feature: Target feature ``j``, or ``{feature: weight}`` (then ``M_j`` becomes ``M @ t``).
        lam: Weight of the bias correction (the paper uses 1; 0 gives ``M_j/|M_j|``).
        layer: Override the approximator's layer.

    Returns:
        A unit-norm vector, method ``"sae-ts"``.

    Raises:
        TypeError: ``feature`` is neither an int nor a mapping.
        ValueError: A feature out of range, ``M @ target = 0``, or ``s = 0``.

    Example:
        >>> v = targeted_vector(approx, 14455)  # "London" in Gemma Scope 2B L12 16k
    """
    weights = _weights(feature, approx.d_sae)
    mj = _unit(approx.M.double() @ _target(weights, approx.d_sae), f"M @ target (features {sorted(weights)})")
    mb, mb_norm = _bias_direction(approx)
    s = _unit(mj - lam * mb, "M_j/|M_j| - lam * Mb/|Mb|")
    return _vector(s, approx, layer, "sae-ts", {"variant": "eq3", **_features_record(weights), "lam": lam, "mb_norm": mb_norm})


def pseudoinverse_vector(
    approx: EffectApproximator,
    target_effect: FeatureTarget | torch.Tensor,
    *,
    target_scale: float = 1.0,
    normalize: bool = True,
    layer: int | None = None,
) -> SteeringVector:
    """``x = (t - b) @ pinv(M)``, ``t = target_scale * target/|target|`` (SAE-TS appendix A).

    Args:
        approx: The fitted approximator.
        target_effect: Desired effect ``[d_sae]``, or a feature id / ``{feature: weight}`` (one-hot
            or weighted target).
        target_scale: Norm of ``t`` (reference default 1).
        normalize: Return ``x/|x|`` (default) or the raw ``x`` like the reference.
        layer: Override the approximator's layer.

    Returns:
        Method ``"sae-ts-pinv"``; ``provenance["norm"]`` is ``|x|`` before normalising.
    """
    if isinstance(target_effect, torch.Tensor):
        if target_effect.shape != (approx.d_sae,):
            raise ValueError(f"target_effect must have shape [{approx.d_sae}], got {tuple(target_effect.shape)}")
        t = target_effect.detach().cpu().double()
        record: dict[str, Any] = {"target_nonzero": int((t != 0).sum())}
    else:
        weights = _weights(target_effect, approx.d_sae)
        t = _target(weights, approx.d_sae)
        record = _features_record(weights)
    t = target_scale * _unit(t, "target_effect")
    x = (t - approx.b.double()) @ torch.linalg.pinv(approx.M.double())
    norm = float(x.norm())
    if normalize:
        x = _unit(x, "the pseudo-inverse solution")
    prov = {"variant": "pinv", **record, "target_scale": target_scale, "normalized": normalize, "norm": norm}
    return _vector(x, approx, layer, "sae-ts-pinv", prov)


@torch.no_grad()
def rotation_matrix(
    approx: EffectApproximator, sae: SparseAutoencoder, *, exclude_features: Iterable[int] = ()
) -> torch.Tensor:
    """``R = U V^T`` from ``C = M_n W_dec_n = U S V^T`` (unit columns of M, unit rows of W_dec):
    the orthogonal ``[d_model, d_model]`` map with ``R d_j ~ M_j / |M_j|`` (float64).

    Raises:
        ValueError: The SAE's ``d_sae``/``d_in`` do not match the approximator's.
    """
    if sae.d_sae != approx.d_sae or sae.d_in != approx.d_model:
        raise ValueError(
            f"the rotation is fit between the approximator's columns and the SAE's decoder rows, so the "
            f"SAE must be the measuring one: approximator d_model={approx.d_model}, d_sae={approx.d_sae}; "
            f"SAE d_in={sae.d_in}, d_sae={sae.d_sae}"
        )
    M = approx.M.double()
    W = sae.W_dec.detach().cpu().double()
    m_norm, w_norm = M.norm(dim=0), W.norm(dim=1)
    keep = (m_norm > 0) & (w_norm > 0)
    excluded = [int(f) for f in exclude_features]
    bad = sorted(f for f in excluded if not 0 <= f < approx.d_sae)
    if bad:
        raise ValueError(f"exclude_features {bad} are out of range 0..{approx.d_sae - 1}")
    if excluded:
        keep[torch.tensor(excluded, dtype=torch.long)] = False
    if not bool(keep.any()):
        raise ValueError("no features left to fit the rotation")
    C = (M[:, keep] / m_norm[keep]) @ (W[keep] / w_norm[keep, None])  # [d_model, d_model]
    U, _, Vh = torch.linalg.svd(C)
    return U @ Vh


def rotation_vector(
    approx: EffectApproximator,
    sae: SparseAutoencoder,
    feature: FeatureTarget,
    *,
    lam: float = 1.0,
    source_sae: SparseAutoencoder | None = None,
    exclude_features: Iterable[int] = (),
    rotation: torch.Tensor | None = None,
    sae_name: str | None = None,
    layer: int | None = None,
) -> SteeringVector:
    """Rotation steering (SAE-TS appendix D): ``normalize(normalize(R d_i) - lam * normalize(M b))``.

    Args:
        approx: The fitted approximator.
        sae: The SAE the effects were measured with (fits ``R``).
        feature: Feature ``i`` whose decoder row ``d_i`` is rotated, or ``{feature: weight}``
            (weighted sum of decoder rows, normalised first, as the reference does).
        lam: Weight of the bias correction (1 in the paper and code).
        source_sae: Take ``d_i`` from this SAE instead (any SAE on the same layer and model: the
            point of rotation steering is to reach features the measuring SAE lacks).
        exclude_features: Features of ``sae`` left out of the rotation fit.
        rotation: A precomputed `rotation_matrix` (saves the SVD when making many vectors).
        sae_name: Name recorded for the feature's SAE (default: its config name).
        layer: Override the approximator's layer.

    Returns:
        A unit-norm vector, method ``"sae-ts-rotation"``.
    """
    src = sae if source_sae is None else source_sae
    if src.d_in != approx.d_model:
        raise ValueError(f"the feature's SAE has d_in={src.d_in}, the approximator d_model={approx.d_model}")
    weights = _weights(feature, src.d_sae)
    excluded = sorted(int(f) for f in exclude_features)
    R = rotation_matrix(approx, sae, exclude_features=excluded) if rotation is None else rotation.detach().cpu().double()
    if R.shape != (approx.d_model, approx.d_model):
        raise ValueError(f"rotation must be [{approx.d_model}, {approx.d_model}], got {tuple(R.shape)}")
    d = _unit(_target(weights, src.d_sae) @ src.W_dec.detach().cpu().double(), "the decoder direction")
    v = _unit(R @ d, "R d_i")
    mb, mb_norm = _bias_direction(approx)
    v = _unit(v - lam * mb, "normalize(R d_i) - lam * Mb/|Mb|")
    prov = {
        "variant": "rotation", **_features_record(weights), "lam": lam, "mb_norm": mb_norm,
        "feature_sae": sae_name or src.config.name, "feature_sae_sha256": src.sha256(),
        "rotation_sae_sha256": sae.sha256(), "exclude_features": excluded,
    }
    return _vector(v, approx, layer, "sae-ts-rotation", prov)
