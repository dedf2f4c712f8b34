"""The SAE trainer: synthetic dictionaries, deterministic resume, evaluation numbers, the splice,
and one end-to-end run on activations captured inside the real engine."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from vsteer.cli.sae import sae as sae_group
from vsteer.sae.model import SaeConfig, SparseAutoencoder
from vsteer.sae.train import evaluate_sae, fold, spliced_lm_loss, train_sae


def synthetic(n: int = 20_000, d: int = 32, m: int = 64, active: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse non-negative sums of ``active`` of ``m`` unit atoms, plus a constant offset."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(dim=1)[:, :active]
    coef = torch.zeros(n, m).scatter(1, idx, 0.5 + 1.5 * torch.rand(n, active, generator=g))
    return coef @ atoms + 0.3 * torch.randn(d, generator=g), atoms


def recovered(sae: SparseAutoencoder, atoms: torch.Tensor) -> float:
    """Share of true atoms whose best decoder row has cosine > 0.9 (rows are unit norm)."""
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-4)
    return float(((atoms @ sae.W_dec.detach().T).max(dim=1).values > 0.9).float().mean())


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_recovers_a_known_dictionary(activation):
    x, atoms = synthetic()
    config = SaeConfig(d_in=32, d_sae=128, activation=activation, k=3 if activation == "topk" else None)
    sae, stats = train_sae(x, config, steps=800, batch_size=256, lr=3e-3, l1_coefficient=1.0, progress=False)
    ev = evaluate_sae(sae, x)
    assert ev["fvu"] < 0.15, ev
    assert recovered(sae, atoms) >= 0.9
    assert stats.steps == 800 and stats.tokens == 800 * 256
    if activation == "topk":
        assert ev["l0"] == pytest.approx(3.0)
    else:
        assert 2 < ev["l0"] < 15
    assert sae.config.provenance["norm_scale"] == pytest.approx(stats.norm_scale)


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    x, _ = synthetic(n=4000, d=16, m=32)
    config = SaeConfig(d_in=16, d_sae=48)
    kw = {"steps": 60, "batch_size": 128, "lr": 3e-3, "l1_coefficient": 1.0, "seed": 3, "checkpoint_every": 10, "progress": False}
    full, _ = train_sae(x, config, checkpoint_dir=tmp_path / "a", **kw)

    _part, stats = train_sae(x, config, checkpoint_dir=tmp_path / "b", stop_at=25, **kw)
    assert stats.steps == 25 and stats.resumed_from == 0
    resumed, stats = train_sae(x, config, checkpoint_dir=tmp_path / "b", **kw)
    assert stats.resumed_from == 25 and stats.steps == 60
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name
    assert full.sha256() == resumed.sha256()

    again, stats = train_sae(x, config, checkpoint_dir=tmp_path / "b", **kw)  # finished: nothing to do
    assert stats.resumed_from == 60 and again.sha256() == full.sha256()
    fresh, stats = train_sae(x, config, checkpoint_dir=tmp_path / "b", resume=False, **kw)
    assert stats.resumed_from == 0 and fresh.sha256() == full.sha256()  # deterministic given the seed
    with pytest.raises(ValueError, match="another run"):
        train_sae(x, config, checkpoint_dir=tmp_path / "b", **{**kw, "lr": 1e-3})


def test_fold_reads_raw_activations():
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=8, d_sae=20, apply_b_dec_to_input=True))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g))
    x, s = 5.0 * torch.randn(64, 8, generator=g), 0.37
    folded = fold(sae, s)
    torch.testing.assert_close(folded(x), sae(x * s) / s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(20))
    torch.testing.assert_close((folded.encode(x) > 0), (sae.encode(x * s) > 0))


def test_evaluate_sae_by_hand():
    sae = SparseAutoencoder(SaeConfig(d_in=2, d_sae=3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, 0.0]])
    # x_hat = relu(x): only [-1, 0] is wrong (error 1); mean [0, 0.5] -> total variance 5
    ev = evaluate_sae(sae, x, batch_size=3)
    assert ev["tokens"] == 4
    assert ev["l0"] == pytest.approx(0.5)
    assert ev["fvu"] == pytest.approx(0.2) and ev["variance_explained"] == pytest.approx(0.8)
    assert ev["mse"] == pytest.approx(0.25)
    assert ev["dead_features"] == 1 and ev["dead_fraction"] == pytest.approx(1 / 3)


def test_spliced_lm_loss_with_an_exact_sae(hf_model):
    """relu(x) - relu(-x) = x: an SAE that reconstructs exactly leaves the loss unchanged."""
    d = hf_model.config.hidden_size
    sae = SparseAutoencoder(SaeConfig(d_in=d, d_sae=2 * d, layer=15))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    texts = ["The cat sat on the mat and looked out of the window.", "def add(a, b):\n    return a + b\n"]
    lm = spliced_lm_loss(hf_model, sae, texts)
    assert lm["spliced_loss"] == pytest.approx(lm["clean_loss"], abs=1e-3)
    assert lm["zero_ablation_loss"] > lm["clean_loss"] + 1.0
    assert lm["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert lm["tokens"] > 20


def test_cli_list_info_import(tmp_path):
    from vsteer.sae.formats import save_sae

    s = SparseAutoencoder(SaeConfig(d_in=8, d_sae=16, layer=3, model="m", activation="topk", k=4))
    save_sae(s, tmp_path / "src")
    store = str(tmp_path / "store")
    run = CliRunner().invoke
    result = run(sae_group, ["list", "--store", store])
    assert result.exit_code == 0 and result.stdout == ""
    result = run(sae_group, ["import", str(tmp_path / "src"), "--name", "tiny", "--store", store])
    assert result.exit_code == 0, result.output
    result = run(sae_group, ["list", "--store", store])
    assert result.stdout.split("\n")[1].split() == ["tiny", "m", "3", "8", "16", "topk(k=4)"]
    info = json.loads(run(sae_group, ["info", "tiny", "--store", store]).stdout)
    assert info["d_sae"] == 16 and info["sha256"] == s.sha256()
    result = run(sae_group, ["import", str(tmp_path / "src"), "--name", "tiny", "--store", store])
    assert result.exit_code != 0  # name taken without --overwrite


def test_cli_train_checks_before_starting_an_engine(tmp_path):
    from vsteer._errors import SaeFileError, SpecError
    from vsteer.sae.store import SaeStore

    store = tmp_path / "store"
    SaeStore(store).add("taken", SparseAutoencoder(SaeConfig(d_in=8, d_sae=16)))
    run = CliRunner().invoke
    result = run(sae_group, ["train", "--name", "x", "--activation", "relu", "--k", "4", "--store", str(store)])
    assert isinstance(result.exception, SpecError) and result.exception.field == "--k"
    result = run(sae_group, ["train", "--name", "taken", "--store", str(store)])
    assert isinstance(result.exception, SaeFileError) and "--overwrite" in str(result.exception)
    result = run(sae_group, ["train", "--name", "bad/name", "--store", str(store)])
    assert isinstance(result.exception, SaeFileError)


def test_python_m_cli_sae(tmp_path):
    import subprocess
    import sys

    from vsteer.sae.store import SaeStore

    SaeStore(tmp_path).add("one", SparseAutoencoder(SaeConfig(d_in=8, d_sae=16, layer=2)))
    out = subprocess.run([sys.executable, "-m", "vsteer.cli", "sae", "list", "--store", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[1].split() == ["one", "-", "2", "8", "16", "relu"]
    err = subprocess.run([sys.executable, "-m", "vsteer.cli", "sae", "info", "nope", "--store", str(tmp_path)],
                         check=False, capture_output=True, text=True)
    assert err.returncode == 1 and err.stderr.startswith("SaeFileError: unknown SAE 'nope'")


def test_train_on_the_real_engine(eager_llm, hf_model, tmp_path):
    """Collect ~1000 tokens at layer 15 inside vLLM, train a width-256 SAE, evaluate, resume."""
    from vsteer.sae.activations import (
        collect_activations,
        load_activations,
        load_sequences,
    )
    from vsteer.sae.store import SaeStore
    from vsteer.sae.train import train_model_sae

    work = tmp_path / "work"
    kw = {"activation": "relu", "width": 256, "tokens": 1000, "work_dir": work, "steps": 300, "batch_size": 256, "lr": 3e-3, "l1_coefficient": 0.5,
              "gen_tokens": 48, "collect_batch": 16, "eval_tokens": 400, "eval_texts": 6, "progress": False, "hf_model": hf_model}
    sae, report = train_model_sae(eager_llm, 15, **kw)
    ev, lm = report["eval"], report["lm"]
    assert sae.layer == 15 and sae.d_in == 576 and sae.config.model == eager_llm.model_shape.name
    assert ev["fvu"] < 0.5 and 1 < ev["l0"] < 200, ev
    assert lm["clean_loss"] < lm["spliced_loss"] < lm["zero_ablation_loss"], lm
    assert json.loads((work / "report.json").read_text())["eval"] == ev

    # the first token (attention sink) is not collected: shard rows start at position 1
    acts = load_activations(work / "train-acts")
    assert acts.shape[0] >= 1000 and acts.norm(dim=1).max() < 5_000
    first = load_sequences(work / "train-acts")[0]
    torch.testing.assert_close(acts[0], eager_llm.capture([first], [15])[0][15][1], rtol=1e-3, atol=1e-2)

    # resume: shards and checkpoint on disk, nothing regenerated or retrained
    mtimes = {p: p.stat().st_mtime_ns for p in (work / "train-acts").iterdir()}
    with pytest.raises(ValueError, match="other settings"):
        collect_activations(eager_llm, 15, num_tokens=1000, out_path=work / "train-acts", gen_tokens=47, batch=16)
    sae2, report2 = train_model_sae(eager_llm, 15, **kw)
    assert report2["train"]["resumed_from"] == 300 and sae2.sha256() == sae.sha256()
    assert {p: p.stat().st_mtime_ns for p in (work / "train-acts").iterdir()} == mtimes

    store = SaeStore(tmp_path / "store")
    store.add("real", sae)
    assert store.get("real").sha256() == sae.sha256()
