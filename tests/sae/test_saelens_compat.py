"""Folders written by SAELens itself (its own classes and save methods), read with vsteer's load_sae.

The reference is SAELens' own forward on the same weights: ``sae_lens`` is pinned in the ``test``
extra. Covers TopK with ``rescale_acts_by_decoder_norm`` (SAELens 6's training default), with and
without ``apply_b_dec_to_input``, through the model, the SAS update and the kernel reference the
engine uses; ReLU and JumpReLU folders; and the config keys vsteer refuses because it cannot
honour them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from vsteer._errors import SaeFileError
from vsteer.kernels.sas_reference import sae_activate, sas_delta_torch
from vsteer.sae import SaeConfig, SparseAutoencoder, load_sae

D_IN, D_SAE, K, LAYER = 24, 96, 6, 3
HOOK = f"blocks.{LAYER}.hook_resid_post"


def meta(hook: str = HOOK) -> SAEMetadata:
    return SAEMetadata(hook_name=hook, model_name="tiny-llama")


def randomise(sl: torch.nn.Module, seed: int) -> None:
    """Random weights with decoder row norms far from 1 (0.05 .. 5) and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sl.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        sl.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.3)
        w_dec = torch.randn(D_SAE, D_IN, generator=g)
        norms = torch.exp(torch.empty(D_SAE).uniform_(-3.0, 1.6, generator=g))
        sl.W_dec.copy_(w_dec / w_dec.norm(dim=-1, keepdim=True) * norms[:, None])
        sl.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.5)
        if hasattr(sl, "threshold"):
            sl.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)


def inputs(seed: int = 7, n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_topk_rescale_by_decoder_norm_matches_saelens(tmp_path: Path, apply_b_dec: bool) -> None:
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=apply_b_dec, metadata=meta())
    assert cfg.rescale_acts_by_decoder_norm  # SAELens' training default: the case of the defect
    sl = TopKTrainingSAE(cfg)
    randomise(sl, seed=1)
    folder = tmp_path / "topk"
    sl.save_model(folder)  # a trainer checkpoint: raw weights, rescale key set in cfg.json
    assert json.loads((folder / "cfg.json").read_text())["rescale_acts_by_decoder_norm"] is True
    ref = SAE.load_from_disk(str(folder))  # SAELens' own reading of the same folder
    assert isinstance(ref, TopKSAE) and ref.cfg.rescale_acts_by_decoder_norm

    sae = load_sae(folder)
    assert (sae.activation, sae.config.k, sae.layer) == ("topk", K, LAYER)
    assert sae.config.apply_b_dec_to_input is apply_b_dec
    assert "rescale_acts_by_decoder_norm" in sae.config.provenance

    x = inputs()
    with torch.no_grad():
        f_ref = ref.encode(x)
        xhat_ref = ref.decode(f_ref)
        assert torch.allclose(f_ref, sl.encode(x), atol=1e-6)  # the training class agrees
        f = sae.encode(x)
        xhat = sae(x)
    assert torch.equal(f != 0, f_ref != 0)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xhat, xhat_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f_ref), xhat_ref, rtol=1e-5, atol=1e-5)

    # The defect: the same weights without the rescale are a different SAE.
    plain = SparseAutoencoder(SaeConfig(d_in=D_IN, d_sae=D_SAE, activation="topk", k=K,
                                        apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(plain, name).copy_(getattr(sl, name))
        assert rel(plain(x) - ref.b_dec, xhat_ref - ref.b_dec) > 0.1


def test_topk_rescale_sas_and_engine_inputs_match_saelens(tmp_path: Path) -> None:
    """SAS on the loaded SAE, and the kernel reference fed what the engine feeds it (W_enc^T,
    encoder_bias(), W_dec), equal SAS computed with SAELens' own encode/decode."""
    sl = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=meta()))
    randomise(sl, seed=2)
    sl.save_model(tmp_path / "topk")
    ref = SAE.load_from_disk(str(tmp_path / "topk"))
    sae = load_sae(tmp_path / "topk")
    x = inputs(seed=3, n=16)
    s = torch.zeros(D_SAE)
    s[[5, 40, 77]] = torch.tensor([4.0, -2.0, 6.0])
    with torch.no_grad():
        z = ref.encode(x)
        steered = sae_activate(z + s, "topk", None, K)
        want = ref.decode(steered) - ref.decode(z)
        got = sae.sas(x, s) - x
        bank = torch.stack([torch.zeros(D_SAE), s])
        index = torch.tensor([0, 1] * 8)
        kernel = sas_delta_torch(x, index, bank, sae.W_enc.t(), sae.encoder_bias(), sae.W_dec,
                                 activation="topk", k=K)
    assert float(want.abs().max()) > 0.1  # the steering does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kernel[1::2], want[1::2], rtol=1e-4, atol=1e-5)
    assert torch.equal(kernel[0::2], torch.zeros_like(kernel[0::2]))  # slot 0: exactly unsteered


def test_topk_inference_save_is_read_the_same(tmp_path: Path) -> None:
    """``save_inference_model`` folds the norms itself but keeps the key set; folding again is a no-op."""
    sl = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=meta()))
    randomise(sl, seed=4)
    sl.save_model(tmp_path / "ckpt")
    sl.save_inference_model(tmp_path / "inference")
    a, b = load_sae(tmp_path / "ckpt"), load_sae(tmp_path / "inference")
    x = inputs(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(a.encode(x), b.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b(x), SAE.load_from_disk(str(tmp_path / "inference"))(x), rtol=1e-5, atol=1e-5)


def test_batchtopk_inference_save_reads_as_jumprelu(tmp_path: Path) -> None:
    """A BatchTopK SAE trained with the rescale is saved for inference as a JumpReLU SAE with the
    norms folded in; the rescale then appears only in ``metadata.training_architecture_details``
    (which describes training and must not be applied again). Its trainer checkpoint (architecture
    ``batchtopk``) is refused."""
    sl = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=meta()))
    assert sl.cfg.rescale_acts_by_decoder_norm
    randomise(sl, seed=9)
    sl.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    sl.save_inference_model(tmp_path / "inference")
    cfg = json.loads((tmp_path / "inference" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and "rescale_acts_by_decoder_norm" not in cfg
    assert cfg["metadata"]["training_architecture_details"]["rescale_acts_by_decoder_norm"] is True
    ref = SAE.load_from_disk(str(tmp_path / "inference"))
    sae = load_sae(tmp_path / "inference")
    assert sae.activation == "jumprelu"
    x = inputs(seed=10)
    with torch.no_grad():
        f_ref = ref.encode(x)
        assert int((f_ref != 0).sum()) > 0
        torch.testing.assert_close(sae.encode(x), f_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), ref(x), rtol=1e-5, atol=1e-5)
    sl.save_model(tmp_path / "checkpoint")
    _refused(tmp_path / "checkpoint", "architecture", "batchtopk")


def test_topk_without_rescale_matches_saelens(tmp_path: Path) -> None:
    sl = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=False, metadata=meta()))
    randomise(sl, seed=6)
    sl.save_model(tmp_path / "sl")
    sae = load_sae(tmp_path / "sl")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sae(x), sl(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(sae.W_dec, sl.W_dec)  # nothing folded


@pytest.mark.parametrize("cls, cfg_cls, activation", [
    (StandardSAE, StandardSAEConfig, "relu"), (JumpReLUSAE, JumpReLUSAEConfig, "jumprelu")])
def test_relu_and_jumprelu_match_saelens(tmp_path: Path, cls, cfg_cls, activation: str) -> None:
    sl = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=meta()))
    randomise(sl, seed=8)
    sl.save_model(tmp_path / "sl")
    sae = load_sae(tmp_path / "sl")
    assert sae.activation == activation
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), sl.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), sl(x), rtol=1e-5, atol=1e-5)


def _refused(folder: Path, key: str, match: str) -> None:
    with pytest.raises(SaeFileError, match=match) as info:
        load_sae(folder)
    assert info.value.key == key


def test_saelens_architectures_vsteer_cannot_honour_are_refused(tmp_path: Path) -> None:
    JumpReLUTranscoder(JumpReLUTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False,
                                                metadata=meta())).save_model(
        tmp_path / "transcoder")
    _refused(tmp_path / "transcoder", "architecture", "jumprelu_transcoder")
    GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())).save_model(tmp_path / "gated")
    _refused(tmp_path / "gated", "architecture", "gated")


def test_saelens_hook_other_than_resid_post_is_refused(tmp_path: Path) -> None:
    StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta("blocks.3.hook_resid_pre"))).save_model(
        tmp_path / "pre")
    _refused(tmp_path / "pre", "hook_name", "hook_resid_pre")


@pytest.mark.parametrize("norm", ["layer_norm", "expected_average_only_in"])
def test_saelens_normalize_activations_is_refused(tmp_path: Path, norm: str) -> None:
    TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, normalize_activations=norm, metadata=meta())).save_model(
        tmp_path / "sl")
    _refused(tmp_path / "sl", "normalize_activations", norm)


def test_saelens_reshape_hook_z_is_refused(tmp_path: Path) -> None:
    StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, reshape_activations="hook_z",
                                  metadata=meta("blocks.3.attn.hook_z"))).save_model(
        tmp_path / "sl")
    _refused(tmp_path / "sl", "reshape_activations", "hook_z")


@pytest.mark.parametrize("value, match", [(True, "only defined for TopK"), ("yes", "true or false")])
def test_rescale_key_outside_topk_or_malformed_is_refused(tmp_path: Path, value, match: str) -> None:
    StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())).save_model(tmp_path / "sl")
    cfg_path = tmp_path / "sl" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rescale_acts_by_decoder_norm"] = value
    cfg_path.write_text(json.dumps(cfg))
    _refused(tmp_path / "sl", "rescale_acts_by_decoder_norm", match)
