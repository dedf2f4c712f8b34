"""SAE files on disk: our own format, SAELens folders and Gemma Scope ``params.npz`` (DESIGN.md 5).

Layouts read by :func:`load_sae` (detected from the file names):

- vsteer: a folder with ``sae.safetensors`` (float32 ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``threshold [d_sae]``) and ``sae.json``
  (``{"format": "vsteer.sae", "format_version": 1, "config": SaeConfig.to_json()}``).
- SAELens: a folder with ``cfg.json`` and ``sae_weights.safetensors`` (same tensor names and
  orientation; JumpReLU as ``threshold`` or ``log_threshold``). Both the pre-6.0 flat config and
  the 6.x config with a ``metadata`` block are read. A TopK folder with
  ``rescale_acts_by_decoder_norm`` (SAELens 6's training default) has the decoder norms folded into
  the weights at load, which is exact; keys that change the math in ways vsteer cannot honour
  (``normalize_activations``, ``reshape_activations``, other hook points, transcoders and other
  architectures) are refused, naming the key.
- Gemma Scope: ``params.npz`` with ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``
  (JumpReLU, ``b_dec`` not subtracted from the input).

Every problem raises :class:`~vsteer._errors.SaeFileError` naming the file (``path``) and, where
there is one, the key or tensor (``key``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vsteer._errors import SaeFileError
from vsteer.sae.model import SaeConfig, SparseAutoencoder

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "check_sae_for_model",
    "load_gemma_scope",
    "load_sae",
    "load_saelens",
    "save_sae",
]

FORMAT = "vsteer.sae"
FORMAT_VERSION = 1
CONFIG_FILE = "sae.json"
WEIGHTS_FILE = "sae.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
GEMMA_SCOPE_FILE = "params.npz"

_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
_SAELENS_HOOK = re.compile(r"blocks\.(0|[1-9][0-9]*)\.hook_resid_post")
_GEMMA_LAYER = re.compile(r"layer_(0|[1-9][0-9]*)")
# Gemma Scope releases of other sites than the residual stream (gemma-scope-2b-pt-mlp, ...-att).
_GEMMA_NOT_RESID = re.compile(r"gemma-scope-.*-(mlp|att|transcoders?)\b")


# ---------------------------------------------------------------------------------- our format


def save_sae(sae: SparseAutoencoder, folder: str | os.PathLike[str]) -> Path:
    """Write ``sae`` to ``folder`` in vsteer's format (``sae.safetensors`` + ``sae.json``).

    A new folder is written under a temporary name beside it and renamed into place, so readers
    see the whole folder or none of it. An existing folder has each file replaced atomically
    (weights first, then the JSON), other files in it are left alone.

    Args:
        sae: The SAE; its weights are written as float32.
        folder: The folder to write; created if missing.

    Returns:
        The folder's path.

    Raises:
        SaeFileError: The weights are not finite, or a file cannot be written.

    Example:
        >>> save_sae(sae, "saes/gemma-l12")
    """
    folder = Path(folder)
    tensors = _tensors_of(sae)
    for key, t in tensors.items():
        _check_finite(key, t, str(folder))
    try:
        if folder.exists():
            if not folder.is_dir():
                raise SaeFileError("not a folder: an SAE is saved as a folder", path=str(folder))
            _write_files(sae, tensors, folder, replace_each=True)
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            _write_files(sae, tensors, tmp, replace_each=False)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not folder.is_dir():
                    raise
                # Someone created the folder meanwhile: fall back to replacing its files.
                _write_files(sae, tensors, folder, replace_each=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise SaeFileError(f"cannot write the SAE: {exc}", path=str(folder)) from exc
    return folder


def _tensors_of(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    return {k: getattr(sae, k).detach().to("cpu", torch.float32).contiguous() for k in _TENSORS}


def _write_files(sae: SparseAutoencoder, tensors: dict[str, torch.Tensor], folder: Path, *, replace_each: bool) -> None:
    from safetensors.torch import save_file

    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": sae.config.to_json()}
    text = json.dumps(header, indent=2, sort_keys=False) + "\n"

    def write(name: str, writer) -> None:
        target = folder / name
        if not replace_each:
            writer(target)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            writer(Path(tmp))
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_weights(p: Path) -> None:
        save_file(tensors, str(p), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        _fsync(p)

    def write_json(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write(WEIGHTS_FILE, write_weights)
    write(CONFIG_FILE, write_json)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_vsteer(folder: Path, *, layer: int | None = None, model: str | None = None) -> SparseAutoencoder:
    cfg_path = folder / CONFIG_FILE
    header = _read_json(cfg_path)
    if header.get("format") != FORMAT:
        raise SaeFileError(f"not a vsteer SAE: format is {header.get('format')!r}, expected {FORMAT!r}",
                           path=str(cfg_path), key="format")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise SaeFileError(f"unsupported format_version {version!r}; this vsteer reads {FORMAT_VERSION}",
                           path=str(cfg_path), key="format_version")
    data = header.get("config")
    if not isinstance(data, dict):
        raise SaeFileError("missing or invalid 'config' object", path=str(cfg_path), key="config")
    try:
        config = SaeConfig.from_json(data)
    except (TypeError, ValueError) as exc:
        raise SaeFileError(f"invalid SAE config: {exc}", path=str(cfg_path), key="config") from exc
    config = _override(config, layer=layer, model=model, path=str(cfg_path))
    weights_path = folder / WEIGHTS_FILE
    tensors = _read_safetensors(weights_path)
    unknown = sorted(set(tensors) - set(_TENSORS))
    if unknown:
        raise SaeFileError(f"unexpected tensors {unknown}; a vsteer SAE holds {list(_TENSORS)}", path=str(weights_path))
    return _build(config, tensors, str(weights_path), required=_TENSORS)


# ---------------------------------------------------------------------------------- dispatch


def load_sae(
    path: str | os.PathLike[str], *, layer: int | None = None, model: str | None = None
) -> SparseAutoencoder:
    """Read an SAE in any supported layout, detected from the file names.

    Args:
        path: A vsteer folder (``sae.json``), a SAELens folder (``cfg.json`` +
            ``sae_weights.safetensors``), a Gemma Scope ``params.npz`` or a folder holding one; or
            one of those files directly.
        layer: The decoder layer the SAE reads: required where the files do not say (a Gemma Scope
            file outside a ``layer_<L>`` folder); where they do, it must agree.
        model: The model name, where the files do not give one; where they do, it must agree.

    Raises:
        SaeFileError: Missing files or keys, wrong shapes, unsupported activation / architecture /
            hook point / input normalisation, non-finite weights.

    Example:
        >>> sae = load_sae("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz")
        >>> sae.layer, sae.activation
        (12, 'jumprelu')
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SaeFileError("no such SAE file or folder", path=str(p))
    if p.is_file():
        name = p.name
        if name.endswith(".npz"):
            return load_gemma_scope(p, layer=layer, model=model)
        if name in (CONFIG_FILE, WEIGHTS_FILE):
            p = p.parent
        elif name in (SAELENS_CONFIG_FILE, SAELENS_WEIGHTS_FILE):
            return load_saelens(p.parent, layer=layer, model=model)
        else:
            raise SaeFileError(_UNKNOWN_LAYOUT, path=str(p))
    if (p / CONFIG_FILE).is_file():
        _require(p / WEIGHTS_FILE)
        return _load_vsteer(p, layer=layer, model=model)
    if (p / SAELENS_CONFIG_FILE).is_file():
        return load_saelens(p, layer=layer, model=model)
    if (p / GEMMA_SCOPE_FILE).is_file():
        return load_gemma_scope(p / GEMMA_SCOPE_FILE, layer=layer, model=model)
    if (p / WEIGHTS_FILE).is_file():
        raise SaeFileError(f"{WEIGHTS_FILE} without {CONFIG_FILE}: missing file", path=str(p / CONFIG_FILE))
    if (p / SAELENS_WEIGHTS_FILE).is_file():
        raise SaeFileError(f"{SAELENS_WEIGHTS_FILE} without {SAELENS_CONFIG_FILE}: missing file",
                           path=str(p / SAELENS_CONFIG_FILE))
    raise SaeFileError(_UNKNOWN_LAYOUT, path=str(p))


_UNKNOWN_LAYOUT = (
    "not an SAE: expected a folder with sae.json + sae.safetensors (vsteer), cfg.json + "
    "sae_weights.safetensors (SAELens), or a params.npz (Gemma Scope)"
)


# ---------------------------------------------------------------------------------- SAELens


def load_saelens(
    folder: str | os.PathLike[str], *, layer: int | None = None, model: str | None = None
) -> SparseAutoencoder:
    """Read a SAELens folder: ``cfg.json`` + ``sae_weights.safetensors``.

    Honoured config keys (top level, or in the 6.x ``metadata`` block): ``d_in``, ``d_sae``,
    ``architecture`` (``standard`` = ReLU, ``jumprelu``, ``topk``), ``activation_fn`` /
    ``activation_fn_str`` (``relu`` or ``topk``) with ``activation_fn_kwargs.k`` or ``k``,
    ``apply_b_dec_to_input`` (SAELens' default: true), ``hook_name`` / ``hook_point``
    (``blocks.<L>.hook_resid_post`` only), ``hook_layer``, ``hook_head_index`` (must be null),
    ``model_name``, ``normalize_activations`` (``"none"``/null/false only). A ``scaling_factor``
    tensor of all ones is dropped; any other is refused.

    Args:
        folder: The folder.
        layer: Where ``cfg.json`` has no ``hook_name``: the decoder layer it reads (resid_post).
        model: Where ``cfg.json`` has no ``model_name``: the model name.

    Raises:
        SaeFileError: See :func:`load_sae`.

    Example:
        >>> sae = load_saelens("gpt2-small-res-post/blocks.8.hook_resid_post")
    """
    folder = Path(folder).expanduser()
    cfg_path = folder / SAELENS_CONFIG_FILE
    weights_path = folder / SAELENS_WEIGHTS_FILE
    _require(cfg_path)
    _require(weights_path)
    raw = _read_json(cfg_path)
    where = str(cfg_path)
    meta = raw.get("metadata", raw.get("meta"))
    meta = meta if isinstance(meta, dict) else {}

    def get(key: str, default: Any = None) -> Any:
        if key in raw and raw[key] is not None:
            return raw[key]
        return meta.get(key, default)

    d_in, d_sae = _int_key(raw, "d_in", where), _int_key(raw, "d_sae", where)

    norm = raw.get("normalize_activations", "none")
    if norm not in (None, "none", False):
        raise SaeFileError(
            f"normalize_activations={norm!r} is not supported: the SAE expects rescaled inputs; "
            "vsteer reads SAEs with normalize_activations 'none' only (fold the scaling into the weights first)",
            path=where, key="normalize_activations")
    if raw.get("finetuning_scaling_factor"):
        raise SaeFileError("finetuning_scaling_factor is not supported", path=where, key="finetuning_scaling_factor")
    if raw.get("reshape_activations") not in (None, "none"):
        raise SaeFileError(f"reshape_activations={raw['reshape_activations']!r} is not supported "
                           "(vsteer reads the residual stream)", path=where, key="reshape_activations")

    activation, k = _saelens_activation(raw, where)
    # SAELens 6 TopK: ``rescale_acts_by_decoder_norm`` (on by default in its training config) multiplies the
    # pre-activations by the decoder row norms before the top-k and divides the activations by them before
    # decoding. Read it from the top level only: that is where SAELens' own config classes read it (a copy in
    # ``metadata.training_architecture_details`` describes training, and SAELens ignores it when loading).
    rescale = raw.get("rescale_acts_by_decoder_norm", False)
    if rescale is None:
        rescale = False
    if not isinstance(rescale, bool):
        raise SaeFileError(f"rescale_acts_by_decoder_norm must be true or false, got {rescale!r}",
                           path=where, key="rescale_acts_by_decoder_norm")
    if rescale and activation != "topk":
        raise SaeFileError(
            f"rescale_acts_by_decoder_norm=true is only defined for TopK SAEs, not {activation!r} "
            f"(architecture {raw.get('architecture', 'standard')!r}); vsteer will not guess what it means here",
            path=where, key="rescale_acts_by_decoder_norm")

    hook_name = get("hook_name", get("hook_point"))
    if hook_name is None:
        if layer is None:
            raise SaeFileError("cfg.json has no hook_name, so where the SAE reads is unknown; pass layer=",
                               path=where, key="hook_name")
        parsed_layer = layer
    else:
        m = _SAELENS_HOOK.fullmatch(str(hook_name))
        if m is None:
            raise SaeFileError(
                f"unsupported hook point {hook_name!r}: vsteer reads only 'blocks.<L>.hook_resid_post' "
                "(the residual stream after decoder layer L)", path=where, key="hook_name")
        parsed_layer = int(m.group(1))
        hook_layer = get("hook_layer")
        if hook_layer is not None and hook_layer != parsed_layer:
            raise SaeFileError(f"hook_layer={hook_layer!r} disagrees with hook_name {hook_name!r}",
                               path=where, key="hook_layer")
    if get("hook_head_index") is not None:
        raise SaeFileError("per-head SAEs (hook_head_index set) are not supported", path=where, key="hook_head_index")

    apply_b = raw.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b, bool):
        raise SaeFileError(f"apply_b_dec_to_input must be true or false, got {apply_b!r}",
                           path=where, key="apply_b_dec_to_input")
    model_name = get("model_name")
    provenance = {
        k2: v for k2, v in {
            "format": "saelens",
            "source": str(folder),
            "architecture": raw.get("architecture", "standard"),
            "hook_name": hook_name,
            "sae_lens_version": get("sae_lens_version"),
            "sae_lens_training_version": get("sae_lens_training_version"),
            "neuronpedia_id": get("neuronpedia_id"),
            "dataset_path": get("dataset_path"),
            "rescale_acts_by_decoder_norm": "folded into W_enc, b_enc and W_dec at load" if rescale else None,
        }.items() if v is not None
    }
    config = _make_config(
        where, d_in=d_in, d_sae=d_sae, activation=activation, k=k, layer=parsed_layer,
        model=str(model_name) if model_name is not None else None, apply_b_dec_to_input=apply_b,
        provenance=provenance)
    config = _override(config, layer=layer, model=model, path=where)

    tensors = _read_safetensors(weights_path)
    if "scaling_factor" in tensors:
        sf = tensors.pop("scaling_factor")
        if not torch.equal(sf.float(), torch.ones_like(sf, dtype=torch.float32)):
            raise SaeFileError("a scaling_factor other than 1 is not supported", path=str(weights_path),
                               key="scaling_factor")
    if activation == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold").double()).float()
    required = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if activation == "jumprelu" else ())
    if activation != "jumprelu":
        tensors.pop("threshold", None)  # a ReLU / TopK SAE has no thresholds
    known = {k2: v for k2, v in tensors.items() if k2 in _TENSORS}
    sae = _build(config, known, str(weights_path), required=required)
    if rescale:
        _fold_decoder_norm(sae)
    return sae


def _fold_decoder_norm(sae: SparseAutoencoder) -> None:
    """Fold SAELens' ``rescale_acts_by_decoder_norm`` into the weights, exactly (up to rounding).

    SAELens (``TopKSAE.encode`` / ``decode``, ``sae_lens/saes/topk_sae.py``) computes, with
    ``n = ||W_dec[j]||`` per feature and ``x' = x - b_dec * apply_b_dec_to_input``:
    ``f = TopK((x' @ W_enc + b_enc) * n)`` and ``x_hat = (f / n) @ W_dec + b_dec``.
    With ``W_enc[:, j] *= n_j``, ``b_enc[j] *= n_j``, ``W_dec[j] /= n_j`` the plain TopK SAE gives
    the same ``f`` (same pre-activations, so the same top-k set) and the same ``x_hat``; ``b_dec``
    is untouched, so the ``apply_b_dec_to_input`` offset (``b_dec @ W_enc``, now scaled) scales
    with the rest. This is SAELens' own fold (``_fold_norm_topk``, used when it saves an inference
    model), including its clamp of zero norms to 1e-8 (such a feature then never contributes).
    """
    with torch.no_grad():
        norm = sae.W_dec.double().norm(dim=-1).clamp(min=1e-8)
        sae.W_enc.copy_((sae.W_enc.double() * norm).to(sae.W_enc.dtype))
        sae.b_enc.copy_((sae.b_enc.double() * norm).to(sae.b_enc.dtype))
        sae.W_dec.copy_((sae.W_dec.double() / norm[:, None]).to(sae.W_dec.dtype))


def _saelens_activation(raw: Mapping[str, Any], where: str) -> tuple[str, int | None]:
    arch = raw.get("architecture") or "standard"
    fn = raw.get("activation_fn", raw.get("activation_fn_str")) or "relu"
    kwargs = raw.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SaeFileError("activation_fn_kwargs must be an object", path=where, key="activation_fn_kwargs")

    def topk_k() -> int:
        k = raw.get("k", kwargs.get("k"))
        if isinstance(k, bool) or not isinstance(k, int):
            raise SaeFileError(f"a TopK SAE needs an integer k (top-level 'k' or activation_fn_kwargs.k), got {k!r}",
                               path=where, key="k")
        return k

    if arch == "standard":
        if fn == "relu":
            return "relu", None
        if fn == "topk":
            return "topk", topk_k()
        raise SaeFileError(f"unsupported activation function {fn!r} (vsteer supports relu, topk, jumprelu)",
                           path=where, key="activation_fn")
    if arch == "jumprelu":
        if fn not in ("relu",):
            raise SaeFileError(f"unsupported activation function {fn!r} for a JumpReLU SAE", path=where,
                               key="activation_fn")
        return "jumprelu", None
    if arch == "topk":
        return "topk", topk_k()
    raise SaeFileError(f"unsupported SAE architecture {arch!r}; vsteer reads 'standard' (ReLU), 'jumprelu' and 'topk'",
                       path=where, key="architecture")


# ---------------------------------------------------------------------------------- Gemma Scope


def load_gemma_scope(
    npz_path: str | os.PathLike[str], *, layer: int | None = None, model: str | None = None
) -> SparseAutoencoder:
    """Read a Gemma Scope ``params.npz``: a JumpReLU SAE on the residual stream.

    Keys ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``;
    ``apply_b_dec_to_input`` is false.

    Args:
        npz_path: The ``.npz`` file, or a folder holding ``params.npz``.
        layer: The decoder layer it reads; by default parsed from a ``layer_<L>`` path component
            (Gemma Scope's ``layer_12/width_16k/average_l0_82/params.npz``), else left unknown.
        model: The model name (Gemma Scope files do not record one).

    Raises:
        SaeFileError: Missing file or keys, wrong shapes, non-finite weights, or a path from an MLP
            or attention release (``gemma-scope-*-mlp`` / ``-att``).

    Example:
        >>> sae = load_gemma_scope("layer_12/width_16k/average_l0_82/params.npz", model="gemma-2-2b")
    """
    import numpy as np

    path = Path(npz_path).expanduser()
    if path.is_dir():
        path = path / GEMMA_SCOPE_FILE
    _require(path)
    where = str(path)
    resolved = path.resolve().as_posix()
    if _GEMMA_NOT_RESID.search(resolved):
        raise SaeFileError("this Gemma Scope release reads an MLP / attention output; vsteer reads the residual "
                           "stream (gemma-scope-*-res) only", path=where)
    if layer is None:
        found = [m.group(1) for part in path.resolve().parts if (m := _GEMMA_LAYER.fullmatch(part))]
        layer = int(found[-1]) if found else None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, ...
        raise SaeFileError(f"cannot read the .npz file: {exc}", path=where) from exc
    tensors: dict[str, torch.Tensor] = {}
    for key, arr in arrays.items():
        name = "W_" + key[2:] if key.startswith("w_") else key
        if name not in _TENSORS:
            continue
        if arr.dtype.kind != "f":
            raise SaeFileError(f"{name} has dtype {arr.dtype}, expected a float array", path=where, key=name)
        tensors[name] = torch.from_numpy(arr.astype(np.float32, copy=False))
    if "W_enc" not in tensors:
        raise SaeFileError("missing key W_enc", path=where, key="W_enc")
    w_enc = tensors["W_enc"]
    if w_enc.ndim != 2:
        raise SaeFileError(f"W_enc has shape {tuple(w_enc.shape)}, expected [d_in, d_sae]", path=where, key="W_enc")
    d_in, d_sae = int(w_enc.shape[0]), int(w_enc.shape[1])
    config = _make_config(
        where, d_in=d_in, d_sae=d_sae, activation="jumprelu", layer=layer, model=model,
        apply_b_dec_to_input=False, provenance={"format": "gemma_scope", "source": where})
    return _build(config, tensors, where, required=_TENSORS)


# ---------------------------------------------------------------------------------- model check


def check_sae_for_model(
    sae: SparseAutoencoder, *, hidden_size: int, num_layers: int, model_name: str | None = None
) -> None:
    """Refuse an SAE that cannot read this model's residual stream.

    Args:
        sae: The SAE.
        hidden_size: The model's hidden size; must equal ``sae.d_in``.
        num_layers: The model's decoder layer count; ``sae.layer`` (when known) must be below it.
        model_name: The model's name. A different ``sae.config.model`` only warns (SAEs are often
            used on a fine-tune of the model they were trained on); names compare by their last
            path component, case-insensitively.

    Raises:
        SaeFileError: ``"SAE has d_in=X but model has hidden size Y"``, or a layer out of range.

    Example:
        >>> check_sae_for_model(sae, hidden_size=2304, num_layers=26, model_name="gemma-2-2b")
    """
    name = sae.config.name or "SAE"
    if sae.d_in != hidden_size:
        raise SaeFileError(f"SAE has d_in={sae.d_in} but model has hidden size {hidden_size}", key=name)
    if sae.layer is not None and not 0 <= sae.layer < num_layers:
        raise SaeFileError(
            f"SAE reads layer {sae.layer} but the model has {num_layers} layers (0..{num_layers - 1})", key=name)
    trained_on = sae.config.model
    if model_name is not None and trained_on is not None and _short(trained_on) != _short(model_name):
        warnings.warn(f"SAE was trained on {trained_on!r}, not {model_name!r}", stacklevel=2)


def _short(name: str) -> str:
    return name.rstrip("/").split("/")[-1].lower()


# ---------------------------------------------------------------------------------- helpers


def _require(path: Path) -> None:
    if not path.is_file():
        raise SaeFileError(f"missing file {path.name}", path=str(path))


def _read_json(path: Path) -> dict[str, Any]:
    _require(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SaeFileError(f"cannot read the JSON file: {exc}", path=str(path)) from exc
    if not isinstance(data, dict):
        raise SaeFileError("the JSON file must hold an object", path=str(path))
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    _require(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # SafetensorError, OSError
        raise SaeFileError(f"cannot read the safetensors file: {exc}", path=str(path)) from exc


def _int_key(raw: Mapping[str, Any], key: str, where: str) -> int:
    if key not in raw:
        raise SaeFileError(f"missing key {key}", path=where, key=key)
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SaeFileError(f"{key} must be a positive integer, got {value!r}", path=where, key=key)
    return value


def _make_config(where: str, **kwargs: Any) -> SaeConfig:
    try:
        return SaeConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SaeFileError(f"invalid SAE config: {exc}", path=where) from exc


def _override(config: SaeConfig, *, layer: int | None, model: str | None, path: str) -> SaeConfig:
    if layer is not None and config.layer is not None and config.layer != layer:
        raise SaeFileError(f"the file says the SAE reads layer {config.layer}, not layer={layer}",
                           path=path, key="layer")
    if model is not None and config.model is not None and config.model != model:
        raise SaeFileError(f"the file says the SAE was trained on {config.model!r}, not model={model!r}",
                           path=path, key="model")
    try:
        return replace(config, layer=config.layer if layer is None else layer,
                       model=config.model if model is None else model)
    except (TypeError, ValueError) as exc:
        raise SaeFileError(f"invalid SAE config: {exc}", path=path) from exc


def _check_finite(key: str, t: torch.Tensor, where: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise SaeFileError(f"{key} contains {int(bad.sum())} non-finite values (of {t.numel()})", path=where, key=key)


def _build(config: SaeConfig, tensors: Mapping[str, torch.Tensor], where: str, *, required: tuple[str, ...]) -> SparseAutoencoder:
    d, m = config.d_in, config.d_sae
    shapes = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,), "threshold": (m,)}
    for key in required:
        if key not in tensors:
            raise SaeFileError(f"missing tensor {key}", path=where, key=key)
    sae = SparseAutoencoder(config)
    with torch.no_grad():
        for key, want in shapes.items():
            if key not in tensors:
                continue  # threshold of a ReLU / TopK SAE: zeros
            t = tensors[key]
            if not t.is_floating_point():
                raise SaeFileError(f"{key} has dtype {t.dtype}, expected a float tensor", path=where, key=key)
            if tuple(t.shape) != want:
                raise SaeFileError(
                    f"{key} has shape {list(t.shape)}, expected {list(want)} (d_in={d}, d_sae={m})",
                    path=where, key=key)
            t = t.to(torch.float32)
            _check_finite(key, t, where)
            getattr(sae, key).copy_(t)
    return sae
