"""SAE files: our format, SAELens folders, Gemma Scope params.npz; every bad input gives a clear
SaeFileError naming the file and the problem. Files are written here from random weights with the
documented key names and shapes (SAELens: cfg.json + sae_weights.safetensors; Gemma Scope: npz)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vsteer._errors import SaeFileError, VsteerError
from vsteer.sae import (
    SaeConfig,
    SparseAutoencoder,
    check_sae_for_model,
    load_gemma_scope,
    load_sae,
    load_saelens,
    save_sae,
)

D_IN, D_SAE = 16, 48


def rand_weights(seed: int = 0, *, threshold: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / 4,
        "b_enc": 0.1 * torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) / 7,
        "b_dec": 0.2 * torch.randn(D_IN, generator=g),
    }
    if threshold:
        w["threshold"] = 0.3 * torch.rand(D_SAE, generator=g)
    return w


def expected_sae(weights: dict[str, torch.Tensor], **cfg) -> SparseAutoencoder:
    sae = SparseAutoencoder(SaeConfig(d_in=D_IN, d_sae=D_SAE, **cfg))
    with torch.no_grad():
        for k, v in weights.items():
            getattr(sae, k).copy_(v)
    return sae


def assert_same_maps(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(a.encode(x), b.encode(x))
        f = a.encode(x)
        assert torch.equal(a.decode(f), b.decode(f))
        assert torch.equal(a(x), b(x))


def assert_round_trip(sae: SparseAutoencoder, tmp_path: Path) -> SparseAutoencoder:
    folder = save_sae(sae, tmp_path / "ours")
    again = load_sae(folder)
    assert again.config == sae.config
    assert again.sha256() == sae.sha256()
    assert_same_maps(sae, again)
    return again


# ------------------------------------------------------------------------------ our format


def test_save_load_round_trip(tmp_path):
    w = rand_weights(1)
    sae = expected_sae(w, activation="jumprelu", layer=5, model="m", name="n", apply_b_dec_to_input=True,
                       provenance={"source": "test"})
    folder = save_sae(sae, tmp_path / "a" / "b")
    assert sorted(os.listdir(folder)) == ["sae.json", "sae.safetensors"]
    assert sorted(os.listdir(folder.parent)) == ["b"]  # no temporary folder left behind
    header = json.loads((folder / "sae.json").read_text())
    assert header["format"] == "vsteer.sae" and header["format_version"] == 1
    assert header["config"] == sae.config.to_json()
    back = load_sae(folder)
    assert back.config == sae.config
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        t = getattr(back, name)
        assert t.dtype == torch.float32 and torch.equal(t, getattr(sae, name))
    assert_same_maps(sae, back)
    # the files themselves are accepted too
    assert load_sae(folder / "sae.json").sha256() == sae.sha256()
    assert load_sae(folder / "sae.safetensors").sha256() == sae.sha256()


def test_save_over_existing_folder_replaces_files(tmp_path):
    folder = tmp_path / "s"
    save_sae(expected_sae(rand_weights(1), activation="relu"), folder)
    (folder / "notes.txt").write_text("mine")
    second = expected_sae(rand_weights(2), activation="topk", k=4)
    save_sae(second, folder)
    assert sorted(os.listdir(folder)) == ["notes.txt", "sae.json", "sae.safetensors"]
    assert load_sae(folder).sha256() == second.sha256()


def test_save_refuses_non_finite(tmp_path):
    w = rand_weights(1)
    w["W_dec"][3, 2] = float("inf")
    with pytest.raises(SaeFileError, match="W_dec contains 1 non-finite values") as err:
        save_sae(expected_sae(w), tmp_path / "x")
    assert err.value.key == "W_dec"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "edit,match,key",
    [
        (lambda h: h.update(format="other"), "not a vsteer SAE", "format"),
        (lambda h: h.update(format_version=2), "unsupported format_version 2", "format_version"),
        (lambda h: h.pop("config"), "missing or invalid 'config'", "config"),
        (lambda h: h["config"].update(bogus=1), "unknown SAE config keys", "config"),
        (lambda h: h["config"].update(activation="gelu"), "unknown SAE activation 'gelu'", "config"),
    ],
)
def test_our_format_bad_json(tmp_path, edit, match, key):
    folder = save_sae(expected_sae(rand_weights()), tmp_path / "s")
    header = json.loads((folder / "sae.json").read_text())
    edit(header)
    (folder / "sae.json").write_text(json.dumps(header))
    with pytest.raises(SaeFileError, match=match) as err:
        load_sae(folder)
    assert err.value.key == key and err.value.path.endswith("sae.json")


def test_our_format_bad_files(tmp_path):
    folder = save_sae(expected_sae(rand_weights()), tmp_path / "s")
    (folder / "sae.json").write_text("{not json")
    with pytest.raises(SaeFileError, match="cannot read the JSON file"):
        load_sae(folder)
    folder = save_sae(expected_sae(rand_weights()), tmp_path / "t")
    (folder / "sae.safetensors").unlink()
    with pytest.raises(SaeFileError, match="missing file sae.safetensors"):
        load_sae(folder)
    folder = save_sae(expected_sae(rand_weights()), tmp_path / "u")
    (folder / "sae.json").unlink()
    with pytest.raises(SaeFileError, match="sae.safetensors without sae.json: missing file") as err:
        load_sae(folder)
    assert err.value.path.endswith("sae.json")
    folder = save_sae(expected_sae(rand_weights()), tmp_path / "v")
    (folder / "sae.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(SaeFileError, match="cannot read the safetensors file"):
        load_sae(folder)
    folder = save_sae(expected_sae(rand_weights()), tmp_path / "w")
    save_file({**rand_weights(), "extra": torch.zeros(2)}, str(folder / "sae.safetensors"))
    with pytest.raises(SaeFileError, match=r"unexpected tensors \['extra'\]"):
        load_sae(folder)


def test_load_unknown_or_missing(tmp_path):
    with pytest.raises(SaeFileError, match="no such SAE file or folder"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaeFileError, match="not an SAE: expected a folder with sae.json"):
        load_sae(tmp_path / "empty")
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(SaeFileError, match="not an SAE"):
        load_sae(tmp_path / "x.bin")
    assert issubclass(SaeFileError, VsteerError)


# ------------------------------------------------------------------------------ SAELens


def write_saelens(folder: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_cfg(**over) -> dict:
    """A pre-6.0 SAELens cfg.json (flat)."""
    cfg = {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "architecture": "jumprelu",
        "activation_fn_str": "relu", "apply_b_dec_to_input": True, "model_name": "tiny-model",
        "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3, "hook_head_index": None,
        "normalize_activations": "none", "context_size": 128, "prepend_bos": True,
        "dataset_path": "some/dataset", "sae_lens_training_version": "3.20.0", "finetuning_scaling_factor": False,
    }
    cfg.update(over)
    return cfg


def test_saelens_jumprelu(tmp_path):
    w = rand_weights(3)
    folder = write_saelens(tmp_path / "sl", saelens_cfg(), w)
    sae = load_saelens(folder)
    cfg = sae.config
    assert (cfg.d_in, cfg.d_sae, cfg.activation, cfg.layer, cfg.hook, cfg.model, cfg.apply_b_dec_to_input) == (
        D_IN, D_SAE, "jumprelu", 3, "resid_post", "tiny-model", True)
    assert cfg.provenance["format"] == "saelens" and cfg.provenance["hook_name"] == "blocks.3.hook_resid_post"
    want = expected_sae(w, activation="jumprelu", layer=3, model="tiny-model", apply_b_dec_to_input=True)
    assert_same_maps(sae, want)
    # SAELens' JumpReLU: relu(pre) * (pre > threshold) with pre = (x - b_dec) @ W_enc + b_enc
    x = torch.randn(5, D_IN)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > w["threshold"]), rtol=1e-5, atol=1e-6)
    assert load_sae(folder).sha256() == sae.sha256()  # dispatch by cfg.json
    assert load_sae(folder / "cfg.json").sha256() == sae.sha256()
    assert_round_trip(sae, tmp_path)


def test_saelens_standard_relu_without_b_dec_on_input(tmp_path):
    w = rand_weights(4, threshold=False)
    folder = write_saelens(tmp_path / "sl", saelens_cfg(architecture="standard", apply_b_dec_to_input=False), w)
    sae = load_sae(folder)
    assert sae.activation == "relu" and not sae.config.apply_b_dec_to_input
    assert torch.equal(sae.threshold, torch.zeros(D_SAE))
    assert_same_maps(sae, expected_sae({k: v for k, v in w.items()}, activation="relu", layer=3, model="tiny-model"))
    assert_round_trip(sae, tmp_path)


def test_saelens_defaults_oldest_cfg(tmp_path):
    """No architecture, no apply_b_dec_to_input: SAELens' defaults are 'standard' and true."""
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.0.hook_resid_post", "model_name": "gpt2",
           "normalize_activations": False}
    sae = load_saelens(write_saelens(tmp_path / "sl", cfg, rand_weights(5, threshold=False)))
    assert (sae.activation, sae.layer, sae.config.apply_b_dec_to_input) == ("relu", 0, True)


@pytest.mark.parametrize(
    "over",
    [
        {"architecture": "topk", "k": 6},
        {"architecture": "topk", "activation_fn_kwargs": {"k": 6}},
        {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6}},
        {"architecture": "standard", "activation_fn": "topk", "k": 6},
    ],
)
def test_saelens_topk_variants(tmp_path, over):
    cfg = saelens_cfg(**over)
    cfg.pop("activation_fn_str") if "activation_fn" in over else None
    w = rand_weights(6, threshold=False)
    sae = load_saelens(write_saelens(tmp_path / "sl", cfg, w))
    assert sae.activation == "topk" and sae.config.k == 6
    assert_same_maps(sae, expected_sae(w, activation="topk", k=6, layer=3, model="tiny-model",
                                       apply_b_dec_to_input=True))
    assert_round_trip(sae, tmp_path)


def test_saelens_v6_metadata_and_log_threshold(tmp_path):
    """SAELens 6.x: run-time facts in a 'metadata' block; a training JumpReLU may store log_threshold."""
    w = rand_weights(7)
    cfg = {
        "architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post", "hook_layer": 12,
                     "hook_head_index": None, "sae_lens_version": "6.5.1", "neuronpedia_id": "x/y"},
    }
    weights = {k: v for k, v in w.items() if k != "threshold"}
    weights["log_threshold"] = torch.log(w["threshold"])
    weights["scaling_factor"] = torch.ones(D_SAE)  # all ones: dropped
    sae = load_sae(write_saelens(tmp_path / "sl", cfg, weights))
    assert (sae.layer, sae.config.model, sae.config.apply_b_dec_to_input) == (12, "gemma-2-2b", False)
    assert sae.config.provenance["sae_lens_version"] == "6.5.1"
    torch.testing.assert_close(sae.threshold, w["threshold"], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        ref = expected_sae({**w, "threshold": sae.threshold.detach().clone()}, activation="jumprelu",
                           layer=12, model="gemma-2-2b")
    assert_same_maps(sae, ref)


def test_saelens_layer_and_model_overrides(tmp_path):
    cfg = saelens_cfg()
    del cfg["hook_name"], cfg["hook_layer"], cfg["model_name"]
    folder = write_saelens(tmp_path / "sl", cfg, rand_weights())
    with pytest.raises(SaeFileError, match="no hook_name.*pass layer=") as err:
        load_saelens(folder)
    assert err.value.key == "hook_name" and err.value.path.endswith("cfg.json")
    sae = load_sae(folder, layer=4, model="mine")
    assert (sae.layer, sae.config.model) == (4, "mine")
    folder2 = write_saelens(tmp_path / "sl2", saelens_cfg(), rand_weights())
    with pytest.raises(SaeFileError, match="reads layer 3, not layer=4"):
        load_sae(folder2, layer=4)
    with pytest.raises(SaeFileError, match="trained on 'tiny-model', not model='other'"):
        load_sae(folder2, model="other")


@pytest.mark.parametrize(
    "over,match,key",
    [
        ({"architecture": "gated"}, "unsupported SAE architecture 'gated'", "architecture"),
        ({"architecture": "standard", "activation_fn_str": "tanh-relu"}, "unsupported activation function 'tanh-relu'",
         "activation_fn"),
        ({"architecture": "topk"}, "TopK SAE needs an integer k", "k"),
        ({"normalize_activations": "expected_average_only_in"},
         "normalize_activations='expected_average_only_in' is not supported", "normalize_activations"),
        ({"normalize_activations": True}, "normalize_activations=True is not supported", "normalize_activations"),
        ({"hook_name": "blocks.3.hook_mlp_out"}, "unsupported hook point 'blocks.3.hook_mlp_out'", "hook_name"),
        ({"hook_name": "blocks.3.hook_resid_pre"}, "only 'blocks.<L>.hook_resid_post'", "hook_name"),
        ({"hook_layer": 4}, "hook_layer=4 disagrees with hook_name", "hook_layer"),
        ({"hook_head_index": 2}, "per-head SAEs", "hook_head_index"),
        ({"d_in": "16"}, "d_in must be a positive integer", "d_in"),
        ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor is not supported",
         "finetuning_scaling_factor"),
    ],
)
def test_saelens_bad_cfg(tmp_path, over, match, key):
    folder = write_saelens(tmp_path / "sl", saelens_cfg(**over), rand_weights())
    with pytest.raises(SaeFileError, match=match) as err:
        load_sae(folder)
    assert err.value.key == key
    assert err.value.path == str(folder / "cfg.json")


def test_saelens_missing_d_sae(tmp_path):
    cfg = saelens_cfg()
    del cfg["d_sae"]
    with pytest.raises(SaeFileError, match="missing key d_sae"):
        load_sae(write_saelens(tmp_path / "sl", cfg, rand_weights()))


@pytest.mark.parametrize(
    "edit,match,key",
    [
        (lambda w: w.pop("W_dec"), "missing tensor W_dec", "W_dec"),
        (lambda w: w.pop("threshold"), "missing tensor threshold", "threshold"),
        (lambda w: w.update(W_enc=w["W_enc"].t()), r"W_enc has shape \[48, 16\], expected \[16, 48\]", "W_enc"),
        (lambda w: w.update(b_dec=torch.zeros(D_IN + 1)), r"b_dec has shape \[17\], expected \[16\]", "b_dec"),
        (lambda w: w["b_enc"].__setitem__(0, float("nan")), "b_enc contains 1 non-finite values", "b_enc"),
        (lambda w: w.update(W_dec=torch.zeros(D_SAE, D_IN, dtype=torch.int32)), "W_dec has dtype torch.int32",
         "W_dec"),
        (lambda w: w.update(scaling_factor=torch.full((D_SAE,), 2.0)), "scaling_factor other than 1",
         "scaling_factor"),
    ],
)
def test_saelens_bad_weights(tmp_path, edit, match, key):
    w = rand_weights()
    edit(w)
    folder = write_saelens(tmp_path / "sl", saelens_cfg(), w)
    with pytest.raises(SaeFileError, match=match) as err:
        load_sae(folder)
    assert err.value.key == key
    assert err.value.path == str(folder / "sae_weights.safetensors")


def test_saelens_missing_files(tmp_path):
    folder = write_saelens(tmp_path / "sl", saelens_cfg(), rand_weights())
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(SaeFileError, match="missing file sae_weights.safetensors") as err:
        load_sae(folder)
    assert err.value.path == str(folder / "sae_weights.safetensors")
    folder = write_saelens(tmp_path / "sl2", saelens_cfg(), rand_weights())
    (folder / "cfg.json").unlink()
    with pytest.raises(SaeFileError, match="sae_weights.safetensors without cfg.json: missing file"):
        load_sae(folder)
    with pytest.raises(SaeFileError, match="missing file cfg.json"):
        load_saelens(folder)


# ------------------------------------------------------------------------------ Gemma Scope


def write_npz(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.numpy() for k, v in weights.items()})
    return path


def test_gemma_scope(tmp_path):
    w = rand_weights(8)
    path = write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_7" / "width_16k" / "average_l0_82" / "params.npz", w)
    sae = load_gemma_scope(path, model="gemma-2-2b")
    cfg = sae.config
    assert (cfg.activation, cfg.layer, cfg.model, cfg.apply_b_dec_to_input, cfg.d_in, cfg.d_sae) == (
        "jumprelu", 7, "gemma-2-2b", False, D_IN, D_SAE)
    assert cfg.provenance["format"] == "gemma_scope"
    assert_same_maps(sae, expected_sae(w, activation="jumprelu", layer=7, model="gemma-2-2b"))
    # Gemma Scope's JumpReLU: relu(pre) * (pre > threshold), pre = x @ W_enc + b_enc (no b_dec on input)
    x = torch.randn(5, D_IN)
    pre = x @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > w["threshold"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae.encode(x) @ w["W_dec"] + w["b_dec"])
    # dispatch: the file, its folder; layer given explicitly wins over the path
    assert load_sae(path).layer == 7
    assert load_sae(path.parent).config.model is None
    assert load_gemma_scope(path, layer=2).layer == 2
    assert_round_trip(sae, tmp_path)


def test_gemma_scope_lowercase_keys_float16_and_no_layer(tmp_path):
    w = rand_weights(9)
    arrays = {("w_enc" if k == "W_enc" else "w_dec" if k == "W_dec" else k): v.half() for k, v in w.items()}
    sae = load_sae(write_npz(tmp_path / "p.npz", arrays))
    assert sae.layer is None and sae.W_enc.dtype == torch.float32
    assert torch.equal(sae.W_enc, w["W_enc"].half().float())


@pytest.mark.parametrize(
    "edit,match,key",
    [
        (lambda w: w.pop("threshold"), "missing tensor threshold", "threshold"),
        (lambda w: w.pop("W_enc"), "missing key W_enc", "W_enc"),
        (lambda w: w.update(W_enc=torch.zeros(D_IN)), r"W_enc has shape \(16,\), expected \[d_in, d_sae\]", "W_enc"),
        (lambda w: w.update(W_dec=torch.zeros(D_IN, D_SAE)), r"W_dec has shape \[16, 48\], expected \[48, 16\]",
         "W_dec"),
        (lambda w: w["W_enc"].__setitem__((0, 0), float("-inf")), "W_enc contains 1 non-finite", "W_enc"),
    ],
)
def test_gemma_scope_bad(tmp_path, edit, match, key):
    w = rand_weights()
    edit(w)
    path = write_npz(tmp_path / "layer_1" / "params.npz", w)
    with pytest.raises(SaeFileError, match=match) as err:
        load_sae(path)
    assert err.value.key == key and err.value.path == str(path)


def test_gemma_scope_bad_files(tmp_path):
    bad = tmp_path / "params.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SaeFileError, match="cannot read the .npz file"):
        load_sae(bad)
    np.savez(tmp_path / "ints.npz", W_enc=np.zeros((D_IN, D_SAE), dtype=np.int64))
    with pytest.raises(SaeFileError, match="W_enc has dtype int64"):
        load_gemma_scope(tmp_path / "ints.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaeFileError, match="missing file params.npz"):
        load_gemma_scope(tmp_path / "empty")
    with pytest.raises(SaeFileError, match="missing file nothing.npz"):
        load_gemma_scope(tmp_path / "nothing.npz")
    mlp = write_npz(tmp_path / "gemma-scope-2b-pt-mlp" / "layer_3" / "params.npz", rand_weights())
    with pytest.raises(SaeFileError, match="MLP / attention output"):
        load_sae(mlp)


# ------------------------------------------------------------------------------ model check


def test_check_sae_for_model():
    sae = expected_sae(rand_weights(), activation="jumprelu", layer=3, model="google/gemma-2-2b")
    check_sae_for_model(sae, hidden_size=D_IN, num_layers=4, model_name="gemma-2-2b")
    with pytest.raises(SaeFileError, match=f"SAE has d_in={D_IN} but model has hidden size 32"):
        check_sae_for_model(sae, hidden_size=32, num_layers=4)
    with pytest.raises(SaeFileError, match=r"SAE reads layer 3 but the model has 3 layers \(0..2\)"):
        check_sae_for_model(sae, hidden_size=D_IN, num_layers=3)
    with pytest.warns(UserWarning, match="trained on 'google/gemma-2-2b', not 'llama'"):
        check_sae_for_model(sae, hidden_size=D_IN, num_layers=4, model_name="llama")
    unknown = expected_sae(rand_weights(), activation="jumprelu")  # no layer, no model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sae_for_model(unknown, hidden_size=D_IN, num_layers=1, model_name="anything")
