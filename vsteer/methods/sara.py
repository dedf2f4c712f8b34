"""SARA: Similarity-based Activation Steering with Repulsion and Attraction (Tlaie 2024).

Definitions (METHODS.md; reference code: atlaie/ethical-llms, ``sara/utils_sara.py``). Matrices
are neurons x tokens; d is the hidden size::

    A            = resid_pre of block l for the steered prompt, transposed      # [d, n]
    X_att, X_rep = the same for the attract / repel prompt                     # [d, n_att], [d, n_rep]
    k            = min(n, n_att, n_rep)
    red(M)       = U[:, :k] @ diag(S[:k])   from the thin SVD  M = U S V^T      # [d, k]
    s_att[i]     = cos(red(A)[i, :], red(X_att)[i, :])   per neuron, over the k components
    s_rep[i]     = cos(red(A)[i, :], red(X_rep)[i, :])
    r            = s_att - s_rep                                                # [d], in [-2, 2]
    A'           = A * (1 + c * r[:, None])         the same factor at every token; reference c = 1

Here ``k`` is written as ``min(n, r_att, r_rep)`` with ``r = min(d, tokens)`` the thin rank of
each matrix; it equals ``min(n, n_att, n_rep)`` whenever the token counts are below ``d``.

**Signs.** The singular vectors of an SVD are defined only up to sign, and the sign chosen by
LAPACK is arbitrary, yet it changes every cosine above: flipping column j of ``U`` for one matrix
flips component j of all its reduced rows. The reference code does not fix them. vsteer computes
every SVD in float64 and flips each left singular vector (together with its column of
``U diag(S)``) so that its largest-magnitude entry is positive; on exact ties of magnitude the
first such index decides. (Where singular values are repeated the singular subspace, not only the
sign, is arbitrary; no rule can fix that and random activations never hit it.)

**When r is computed.** vsteer computes ``r`` ONCE, from the whole steered prompt (``n`` = its
token count), and applies the per-neuron factor ``1 + c r`` to every position: the prompt's
positions and every generated token's.

The reference hook instead recomputes ``r`` on every forward pass, including each decoding step,
where the hook sees a single new token: ``n = 1``, hence ``k = 1``. Over one component the
cosine is just the product of signs, ``sign(red(A)[i, 0]) * sign(red(X)[i, 0])``, which is -1 or
+1 (0 only where an entry is exactly zero). So ``s_att, s_rep`` are in {-1, +1}, ``r`` is in
{-2, 0, +2} and the factor ``1 + c r`` is in {1 - 2c, 1, 1 + 2c}, i.e. {-1, 1, 3} for the
reference c = 1 (the values 1 - c and 1 + c occur only for exactly-zero entries). Each generated
token's activations are therefore tripled on neurons whose sign agrees with the first attract
singular vector and disagrees with the first repel one, negated on the reverse, and kept elsewhere,
and which is which also depends on the arbitrary SVD signs. vsteer does not copy that behaviour.

Everything here imports with plain torch (plus safetensors for ``SaraSet.save``/``load``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SaraSet", "apply_sara", "reduce", "sara_factor", "sara_r"]

METHOD_NAME = "sara-set"
FORMAT_VERSION = 1
_KEY_METHOD = "vsteer.method"
_KEY_FORMAT_VERSION = "vsteer.format_version"
_KEY_PROVENANCE = "vsteer.provenance"


def _check_matrix(m: Any, name: str) -> torch.Tensor:
    m = torch.as_tensor(m)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [hidden, tokens] matrix, got shape {tuple(m.shape)}")
    if m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(m.shape)}")
    if not (m.is_floating_point() or m.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real floating-point tensor, got {m.dtype}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return m


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def reduce(M: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """SARA's reduced matrix ``red(M) = U[:, :k] @ diag(S[:k])`` from the thin SVD ``M = U S V^T``.

    The SVD is computed in float64 on the input's device. Signs are fixed deterministically: each
    left singular vector (and so its column of the result) is flipped so that its largest-|.|
    entry is positive; on exact ties of magnitude the first such index decides. As a consequence
    ``reduce(M, k)`` is exactly the first ``k`` columns of ``reduce(M)``, ``reduce(-M) ==
    reduce(M)`` and ``reduce(M @ Q) == reduce(M)`` for any orthogonal ``Q`` (up to rounding):
    the result depends only on ``M M^T``.

    Args:
        M: ``[d, n]`` matrix, neurons x tokens.
        k: number of components; defaults to the full thin rank ``min(d, n)``. A larger ``k`` is
            clipped to ``min(d, n)`` (like slicing ``U[:, :k]``).

    Returns:
        ``[d, min(k, d, n)]`` float64 tensor.

    Raises:
        ValueError: ``M`` is not a non-empty finite 2-D matrix, or ``k < 1``.

    Example:
        >>> reduce(torch.randn(64, 5), 3).shape
        torch.Size([64, 3])
    """
    M = _check_matrix(M, "M").to(torch.float64)
    r = min(M.shape)
    k = r if k is None else min(_check_k(k), r)
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    U, S = U[:, :k], S[:k]
    idx = U.abs().argmax(dim=0)  # first index of the maximum on ties
    signs = torch.sign(U.gather(0, idx[None, :]))[0]
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)  # cannot happen for unit columns
    return U * (signs * S)[None, :]


def _row_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float64; a pair involving a zero row gives 0 (never NaN)."""
    num = (x * y).sum(dim=1)
    den = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(y, dim=1)
    ok = den > 0
    cos = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    return cos.clamp(-1.0, 1.0)


@dataclass(frozen=True, eq=False)
class SaraSet:
    """The attract and repel sides of a SARA steer, reduced once at full thin rank.

    Attributes:
        attract: ``reduce(X_att)``, ``[d, r_att]`` with ``r_att = min(d, n_att)``; float64 or float32.
        repel: ``reduce(X_rep)``, ``[d, r_rep]``.
        provenance: optional JSON-serialisable dict (prompts, layer, model, ...), saved with the set.

    Storing the full-rank reductions is enough for any later steered prompt: ``reduce(M, k)``
    equals the first ``k`` columns of ``reduce(M)``, so ``truncate(k)`` recovers the reduction
    at any smaller ``k``.

    Example:
        >>> s = SaraSet.from_activations(x_att, x_rep)      # [d, n_att], [d, n_rep]
        >>> r = sara_r(a, s)                                  # a: [d, n] steered prompt
    """

    attract: torch.Tensor
    repel: torch.Tensor
    provenance: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("attract", "repel"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"SaraSet.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"SaraSet.{name} must be float32 or float64, got {t.dtype}")
            _check_matrix(t, f"SaraSet.{name}")
            if t.shape[1] > t.shape[0]:
                raise ValueError(
                    f"SaraSet.{name} has {t.shape[1]} columns but only {t.shape[0]} rows; a reduced "
                    "matrix has at most min(d, tokens) columns"
                )
        if self.attract.shape[0] != self.repel.shape[0]:
            raise ValueError(
                f"attract and repel have different hidden sizes: {self.attract.shape[0]} vs {self.repel.shape[0]}"
            )
        if self.provenance is not None:
            if not isinstance(self.provenance, dict):
                raise ValueError(f"provenance must be a dict or None, got {type(self.provenance).__name__}")
            try:
                json.dumps(self.provenance)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"provenance must be JSON-serialisable: {exc}") from exc

    @property
    def hidden_size(self) -> int:
        return int(self.attract.shape[0])

    @classmethod
    def from_activations(
        cls,
        x_att: torch.Tensor,
        x_rep: torch.Tensor,
        *,
        provenance: dict[str, Any] | None = None,
    ) -> "SaraSet":
        """Reduce the attract ``[d, n_att]`` and repel ``[d, n_rep]`` activations (float64).

        Raises:
            ValueError: a matrix is not non-empty, finite and 2-D, or the hidden sizes differ.
        """
        x_att = _check_matrix(x_att, "x_att")
        x_rep = _check_matrix(x_rep, "x_rep")
        if x_att.shape[0] != x_rep.shape[0]:
            raise ValueError(
                f"x_att and x_rep have different hidden sizes: {x_att.shape[0]} vs {x_rep.shape[0]}"
            )
        return cls(reduce(x_att), reduce(x_rep), provenance)

    def truncate(self, k: int) -> "SaraSet":
        """The set reduced to (at most) ``k`` components: the first ``k`` columns of each side.

        Equal to ``SaraSet(reduce(X_att, k), reduce(X_rep, k))``; a side with fewer than ``k``
        columns is kept whole, exactly as ``reduce`` clips ``k``.
        """
        k = _check_k(k)
        return SaraSet(self.attract[:, :k], self.repel[:, :k], self.provenance)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the set as safetensors: tensors ``attract`` and ``repel`` (dtype kept),
        metadata ``vsteer.method = "sara-set"``, ``vsteer.format_version = "1"`` and, when set,
        ``vsteer.provenance`` (JSON)."""
        from safetensors.torch import save_file

        tensors = {
            "attract": self.attract.detach().to("cpu").contiguous(),
            "repel": self.repel.detach().to("cpu").contiguous(),
        }
        metadata = {_KEY_METHOD: METHOD_NAME, _KEY_FORMAT_VERSION: str(FORMAT_VERSION)}
        if self.provenance is not None:
            metadata[_KEY_PROVENANCE] = json.dumps(self.provenance, sort_keys=True)
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SaraSet":
        """Read a set written by ``save``; tensors come back bit-exact on the CPU.

        Raises:
            VectorFileError: the file is missing, not safetensors, not a SARA set, of a newer
                format version, or lacks one of the two tensors; ``key`` names the culprit.
        """
        from safetensors import safe_open

        from vsteer._errors import VectorFileError

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise VectorFileError("no such SARA set file", path=path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get(_KEY_METHOD) != METHOD_NAME:
                    raise VectorFileError(
                        f"not a SARA set: {_KEY_METHOD} is {meta.get(_KEY_METHOD)!r}, expected {METHOD_NAME!r}",
                        path=path,
                        key=_KEY_METHOD,
                    )
                version = meta.get(_KEY_FORMAT_VERSION)
                if version != str(FORMAT_VERSION):
                    raise VectorFileError(
                        f"unsupported SARA set format version {version!r}; this vsteer reads {FORMAT_VERSION}",
                        path=path,
                        key=_KEY_FORMAT_VERSION,
                    )
                names = set(f.keys())
                for name in ("attract", "repel"):
                    if name not in names:
                        raise VectorFileError("missing tensor", path=path, key=name)
                attract, repel = f.get_tensor("attract"), f.get_tensor("repel")
        except VectorFileError:
            raise
        except Exception as exc:  # SafetensorError and friends on a bad header
            raise VectorFileError(f"not a readable safetensors file: {exc}", path=path) from exc
        provenance = None
        if _KEY_PROVENANCE in meta:
            try:
                provenance = json.loads(meta[_KEY_PROVENANCE])
            except ValueError as exc:
                raise VectorFileError(f"provenance is not JSON: {exc}", path=path, key=_KEY_PROVENANCE) from exc
        try:
            return cls(attract, repel, provenance)
        except ValueError as exc:
            raise VectorFileError(str(exc), path=path) from exc


def sara_r(a: torch.Tensor, sara_set: SaraSet) -> torch.Tensor:
    """Per-neuron SARA score ``r = s_att - s_rep`` for the steered prompt's activations.

    ``k = min(n, r_att, r_rep)`` (``r_*`` = columns of the set's matrices); ``s_att[i]`` is the
    cosine between row ``i`` of ``reduce(a, k)`` and row ``i`` of the attract side's first ``k``
    columns, ``s_rep`` likewise. A cosine involving a zero row is 0. Math in float64.

    Args:
        a: ``[d, n]`` activations of the steered prompt, neurons x tokens.
        sara_set: the reduced attract / repel matrices.

    Returns:
        ``[d]`` float64 tensor with entries in ``[-2, 2]``.

    Raises:
        ValueError: ``a`` is not a non-empty finite 2-D matrix, or its hidden size differs from
            the set's.
    """
    a = _check_matrix(a, "a")
    if a.shape[0] != sara_set.hidden_size:
        raise ValueError(f"a has hidden size {a.shape[0]} but the SARA set has {sara_set.hidden_size}")
    k = min(a.shape[1], sara_set.attract.shape[1], sara_set.repel.shape[1])
    red_a = reduce(a, k)
    dev = red_a.device
    att = sara_set.attract[:, :k].to(device=dev, dtype=torch.float64)
    rep = sara_set.repel[:, :k].to(device=dev, dtype=torch.float64)
    return _row_cosine(red_a, att) - _row_cosine(red_a, rep)


def sara_factor(r: torch.Tensor, c: float) -> torch.Tensor:
    """The per-neuron multiplicative factor ``1 + c * r`` (float64); ``c = 0`` gives exact ones."""
    r = torch.as_tensor(r).to(torch.float64)
    if r.ndim != 1:
        raise ValueError(f"r must be 1-D [hidden], got shape {tuple(r.shape)}")
    c = float(c)
    if c != c or c in (float("inf"), float("-inf")):
        raise ValueError(f"c must be finite, got {c}")
    if c == 0.0:
        return torch.ones_like(r)
    return 1.0 + c * r


def apply_sara(a: torch.Tensor, sara_set: SaraSet, c: float) -> torch.Tensor:
    """``A' = A * (1 + c r)[:, None]`` with ``r = sara_r(a, sara_set)``: SARA on one ``[d, n]``
    matrix. Computed in float64 and returned in ``a``'s dtype (``c = 0`` returns ``a`` exactly)."""
    a = _check_matrix(a, "a")
    factor = sara_factor(sara_r(a, sara_set), c)
    out_dtype = a.dtype if a.is_floating_point() else torch.float64
    return (a.to(torch.float64) * factor[:, None]).to(out_dtype)
