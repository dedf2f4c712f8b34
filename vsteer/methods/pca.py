"""repeng-style PCA steering directions from paired activations (vgel/repeng, ``read_representations``).

Given N pairs of activations (one positive and one negative row per pair, paired by index),
repeng fits ``sklearn.decomposition.PCA(n_components=1)`` to a training matrix and takes its first
component. What it fits, exactly:

``mode="diff"`` (repeng's ``pca_diff``, its default)
    the paired differences ``D_i = pos_i - neg_i``. sklearn's PCA CENTERS its input, so the
    direction is the top right singular vector of ``D - mean(D)``: the axis along which the
    differences *vary most around their mean*. The mean difference itself is removed; if every
    pair differs by the same vector (or N = 1) there is no variance and no direction (ValueError).
    A behaviour is found when its strength varies across pairs.

``mode="center"`` (repeng's ``pca_center``)
    each pair's mean ``(pos_i + neg_i) / 2`` is subtracted from both members and PCA is run over
    the 2N centered rows ``+D_i / 2`` and ``-D_i / 2``. Those rows already have mean zero, so
    sklearn's own centering does nothing, and the direction is the top right singular vector of
    the *uncentered* differences: it keeps the mean difference. This works with N = 1.

Sign (repeng's rule): project both members of every pair on the direction ``v`` and count the
pairs where the positive member projects higher and those where it projects lower; flip ``v``
when "lower" wins. repeng keeps sklearn's arbitrary sign on a tie; vsteer breaks ties
deterministically, first by the mean over pairs of ``(pos_i - neg_i) . v`` (made positive), then,
if that is exactly 0 as well, by making the largest-|.| entry of ``v`` positive (first index on
ties). Swapping positive and negative therefore negates the direction except in that last,
degenerate case.

Math is float64 (``torch.linalg.svd``; no sklearn); the result is a unit-norm float32 vector.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

__all__ = ["pca_direction"]

PcaMode = Literal["diff", "center"]


def _as_matrix(x: Any, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [pairs, hidden] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one pair")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has hidden size 0")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got {x.dtype}")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def pca_direction(
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    mode: PcaMode = "diff",
) -> torch.Tensor:
    """First principal component of paired activations, as repeng computes it.

    Args:
        positive: ``[N, d]``, row i is the positive member of pair i.
        negative: ``[N, d]``, row i is the negative member of pair i.
        mode: ``"diff"`` (repeng ``pca_diff``: PCA of the mean-centered differences) or
            ``"center"`` (repeng ``pca_center``: PCA of the pair-centered rows, which equals the
            uncentered PCA of the differences). See the module docstring.

    Returns:
        ``[d]`` float32 unit vector, signed so that the positive member of most pairs projects
        higher than the negative one (ties broken as in the module docstring).

    Raises:
        ValueError: empty sets, wrong ndim, different pair counts or hidden sizes, NaN/Inf
            values, an unknown mode, or (mode ``"diff"``) differences with no variance.

    Example:
        >>> v = pca_direction(pos_acts, neg_acts, mode="center")   # [N, d] each
    """
    if mode not in ("diff", "center"):
        raise ValueError(f"mode must be 'diff' or 'center', got {mode!r}")
    pos = _as_matrix(positive, "positive")
    neg = _as_matrix(negative, "negative")
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"positive and negative have different hidden sizes: {pos.shape[1]} vs {neg.shape[1]}")
    if pos.shape[0] != neg.shape[0]:
        raise ValueError(
            f"positive and negative must be paired row by row, got {pos.shape[0]} positive and "
            f"{neg.shape[0]} negative rows"
        )
    if pos.device != neg.device:
        neg = neg.to(pos.device)

    diffs = pos - neg  # [N, d]
    if mode == "diff":
        train = diffs - diffs.mean(dim=0, keepdim=True)
    else:
        center = (pos + neg) / 2
        train = torch.cat([pos - center, neg - center])  # +-D/2; already mean zero
        train = train - train.mean(dim=0, keepdim=True)  # what sklearn does (a no-op up to rounding)

    _, S, Vh = torch.linalg.svd(train, full_matrices=False)
    scale = float(torch.linalg.vector_norm(diffs))
    if scale == 0.0 or float(S[0]) <= 1e-10 * scale:
        if mode == "diff":
            raise ValueError(
                "the paired differences have no variance around their mean (N = 1, or every pair "
                "differs by the same vector): pca_diff centers the differences, so it has no "
                "direction here; use mode='center' or a mean difference"
            )
        raise ValueError("every positive row equals its negative row: no direction to find")
    v = Vh[0]
    v = v / torch.linalg.vector_norm(v)

    proj = diffs @ v  # (pos_i - neg_i) . v, the same for the pair-centered rows
    larger = int((proj > 0).sum())
    smaller = int((proj < 0).sum())
    if smaller != larger:
        flip = smaller > larger
    else:
        mean_proj = float(proj.mean())
        if mean_proj != 0.0:
            flip = mean_proj < 0
        else:
            flip = bool(v[int(v.abs().argmax())] < 0)
    if flip:
        v = -v
    return v.to(torch.float32)
