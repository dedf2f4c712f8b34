"""SAE-TS on synthetic data (pure torch): the effects file, the approximator fits, eq. 3, the
pseudo-inverse and rotation variants, the report helpers and the ``vsteer effects`` CLI."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from vsteer.cli.effects import effects
from vsteer.effects import (
    EffectApproximator,
    EffectsFileError,
    load_effects,
    plot_approximator_fit,
    plot_effect_heatmap,
    pseudoinverse_vector,
    rotation_matrix,
    rotation_vector,
    save_effects,
    targeted_vector,
    top_effects_table,
    train_test_split,
)
from vsteer.sae import SaeConfig, SparseAutoencoder, save_sae
from vsteer.vectors import VectorStore, load_vector

D_MODEL, D_SAE = 16, 24
META = {"layer": 3, "sae": "toy-sae", "model": "toy-model"}


def synthetic(n: int = 2000, noise: float = 0.01, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D_MODEL, generator=g)
    X = X / X.norm(dim=1, keepdim=True)
    M = torch.randn(D_MODEL, D_SAE, generator=g)
    b = torch.randn(D_SAE, generator=g)
    Y = X @ M + b + noise * torch.randn(n, D_SAE, generator=g)
    return X, Y, M, b


def toy_sae(W_dec: torch.Tensor, name: str | None = None) -> SparseAutoencoder:
    d_sae, d_in = W_dec.shape
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, d_sae=d_sae, layer=META["layer"], name=name))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
    return sae


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------------- split and fits


def test_train_test_split():
    train, test = train_test_split(1000, 0.1, seed=3)
    assert len(train) == 900 and len(test) == 100
    assert sorted(torch.cat([train, test]).tolist()) == list(range(1000))
    again = train_test_split(1000, 0.1, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    assert not torch.equal(train_test_split(1000, 0.1, seed=4)[1], test)
    assert len(train_test_split(5, 0.0)[1]) == 0 and len(train_test_split(5, 0.01)[1]) == 1
    with pytest.raises(ValueError):
        train_test_split(10, 1.0)


def test_least_squares_recovers_linear_map():
    X, Y, M, b = synthetic()
    train, test = train_test_split(len(X), 0.1, seed=0)
    approx = EffectApproximator.fit_least_squares(X[train], Y[train], layer=3, sae="toy-sae")
    assert (approx.M - M).abs().max() < 0.01 and (approx.b - b).abs().max() < 0.01
    metrics = approx.evaluate(X[test], Y[test])
    assert metrics["mse"] < 1.5e-4  # the noise variance is 1e-4
    assert metrics["r2"] > 0.999 and metrics["cosine_centered"] > 0.999 and metrics["topk_overlap"] > 0.95
    assert approx.meta["fit"]["method"] == "lstsq" and approx.meta["fit"]["rank"] == D_MODEL
    # Inputs are unit-normalised first (as the reference does), so a scaled X gives the same fit.
    again = EffectApproximator.fit_least_squares(3.0 * X[train], Y[train])
    assert torch.allclose(again.M, approx.M, atol=1e-5)
    # Ridge shrinks M; with fewer rows than d_model the pseudo-inverse gives a finite min-norm fit.
    assert EffectApproximator.fit_least_squares(X, Y, ridge=100.0).M.norm() < approx.M.norm()
    small = EffectApproximator.fit_least_squares(X[:5], Y[:5])
    assert torch.allclose(small.predict(X[:5]), Y[:5], atol=1e-4)


def test_adam_recovers_linear_map():
    X, Y, M, b = synthetic()
    train, test = train_test_split(len(X), 0.1, seed=0)
    approx = EffectApproximator.fit_adam(X[train], Y[train], lr=2e-2, epochs=30, seed=1, progress=False)
    metrics = approx.evaluate(X[test], Y[test])
    assert metrics["r2"] > 0.999, metrics
    assert metrics["mse"] < 2e-4 and metrics["cosine"] > 0.999  # the noise variance is 1e-4
    assert (approx.M - M).abs().max() < 0.05 and (approx.b - b).abs().max() < 0.01
    fit = approx.meta["fit"]
    assert fit["method"] == "adam" and len(fit["train_loss"]) == 30 and fit["train_loss"][-1] < fit["train_loss"][0]
    # Same seed, same result.
    again = EffectApproximator.fit_adam(X[train], Y[train], lr=2e-2, epochs=2, seed=1, progress=False)
    third = EffectApproximator.fit_adam(X[train], Y[train], lr=2e-2, epochs=2, seed=1, progress=False)
    assert torch.equal(again.M, third.M)


def test_adam_defaults_follow_the_reference():
    params = inspect.signature(EffectApproximator.fit_adam).parameters
    assert (params["lr"].default, params["epochs"].default, params["batch_size"].default) == (2e-4, 15, 64)


def test_evaluate_perfect_and_bias_only():
    X, Y, M, b = synthetic(n=300, noise=0.0)
    perfect = EffectApproximator(M, b).evaluate(X, Y, k=5)
    assert perfect["mse"] < 1e-10 and perfect["r2"] == pytest.approx(1.0)
    assert perfect["cosine"] == pytest.approx(1.0) and perfect["topk_overlap"] == 1.0 and perfect["n"] == 300
    bias_only = EffectApproximator(torch.zeros(D_MODEL, D_SAE), Y.mean(dim=0)).evaluate(X, Y)
    assert abs(bias_only["r2"]) < 1e-6 and abs(bias_only["cosine_centered"]) < 0.05  # float32 rounding noise


# ---------------------------------------------------------------------- eq. 3, pinv, rotation

M_TINY = torch.tensor([[3.0, 0.0, 1.0, 0.0],
                       [4.0, 0.0, 0.0, 1.0],
                       [0.0, 5.0, 0.0, 0.0]])  # [d_model=3, d_sae=4]
B_TINY = torch.tensor([0.0, 0.0, 1.0, 0.0])    # Mb = M @ b = column 2 = [1, 0, 0]


def test_targeted_vector_is_eq3_by_hand():
    approx = EffectApproximator(M_TINY, B_TINY, layer=7, sae="toy-sae", model="toy-model")
    v = targeted_vector(approx, 0)
    # M_0/|M_0| = [0.6, 0.8, 0]; minus Mb/|Mb| = [1, 0, 0] -> [-0.4, 0.8, 0]; normalised.
    expected = torch.tensor([-0.4, 0.8, 0.0]) / math.sqrt(0.8)
    assert v.layer_indices == [7] and v.model == "toy-model" and v.method == "sae-ts"
    assert torch.allclose(v.layers[7], expected, atol=1e-6)
    half = targeted_vector(approx, 0, lam=0.5).layers[7]
    assert torch.allclose(half, torch.tensor([0.1, 0.8, 0.0]) / math.sqrt(0.65), atol=1e-6)
    assert torch.allclose(targeted_vector(approx, 1, lam=0.0).layers[7], torch.tensor([0.0, 0.0, 1.0]))
    # Several features: M @ t replaces M_j (the reference's weighted target).
    mix = targeted_vector(approx, {0: 1.0, 1: 1.0}, lam=0.0).layers[7]
    assert torch.allclose(mix, torch.tensor([3.0, 4.0, 5.0]) / math.sqrt(50.0), atol=1e-6)
    prov = v.provenance
    assert prov["feature"] == 0 and prov["lam"] == 1.0 and prov["variant"] == "eq3" and prov["sae"] == "toy-sae"
    assert prov["approximator"]["sha256"] == approx.sha256 and prov["mb_norm"] == pytest.approx(1.0)
    # No bias: the bias term vanishes instead of dividing by zero.
    no_bias = EffectApproximator(M_TINY, torch.zeros(4), layer=7)
    assert torch.allclose(targeted_vector(no_bias, 0).layers[7], torch.tensor([0.6, 0.8, 0.0]))
    with pytest.raises(ValueError, match="out of range"):
        targeted_vector(approx, 4)
    with pytest.raises(ValueError, match="no layer"):
        targeted_vector(EffectApproximator(M_TINY, B_TINY), 0)
    # M_2 is exactly Mb: s = 0 cannot be normalised.
    with pytest.raises(ValueError, match="zero norm"):
        targeted_vector(approx, 2)


def test_pseudoinverse_vector():
    g = torch.Generator().manual_seed(0)
    M, b = torch.randn(3, 3, generator=g), torch.randn(3, generator=g)
    approx = EffectApproximator(M, b, layer=1)
    raw = pseudoinverse_vector(approx, 2, target_scale=2.0, normalize=False).layers[1]
    # Square invertible M: the prediction hits the target exactly.
    assert torch.allclose(approx.predict(raw), torch.tensor([0.0, 0.0, 2.0]), atol=1e-5)
    unit = pseudoinverse_vector(approx, 2, target_scale=2.0)
    assert unit.method == "sae-ts-pinv" and unit.norms()[1] == pytest.approx(1.0, abs=1e-6)
    assert unit.provenance["norm"] == pytest.approx(float(raw.norm()), rel=1e-5)
    assert torch.allclose(unit.layers[1], raw / raw.norm(), atol=1e-6)
    # Wide M (d_sae > d_model): the least-squares residual is orthogonal to M's rows.
    wide = EffectApproximator(M_TINY, B_TINY, layer=1)
    target = torch.tensor([1.0, 2.0, 0.0, 0.0])
    x = pseudoinverse_vector(wide, target, normalize=False).layers[1]
    residual = wide.predict(x) - target / target.norm()
    assert torch.allclose(residual @ M_TINY.T, torch.zeros(3), atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        pseudoinverse_vector(wide, torch.ones(3))


def test_rotation_recovers_an_exact_rotation():
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(D_SAE, D_MODEL, generator=g, dtype=torch.float64)
    Q = random_orthogonal(D_MODEL, seed=2)
    scales = torch.rand(D_SAE, generator=g, dtype=torch.float64) + 0.5
    M = (Q @ W_dec.T) * scales  # column j = scale_j * Q d_j
    b = torch.randn(D_SAE, generator=g)
    approx = EffectApproximator(M.float(), b, layer=3, sae="toy-sae")
    sae = toy_sae(W_dec.float(), name="toy-sae")
    R = rotation_matrix(approx, sae)
    assert torch.allclose(R, Q, atol=1e-5)
    assert torch.allclose(R @ R.T, torch.eye(D_MODEL, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(rotation_matrix(approx, sae, exclude_features=[0, 5]), Q, atol=1e-5)
    # R d_i points along M_i, so rotation steering equals eq. 3 here (with and without the bias).
    for lam in (0.0, 1.0):
        rot = rotation_vector(approx, sae, 5, lam=lam)
        assert rot.method == "sae-ts-rotation"
        assert torch.allclose(rot.layers[3], targeted_vector(approx, 5, lam=lam).layers[3], atol=1e-5)
    # A feature of another SAE on the same layer is rotated the same way.
    other = toy_sae(torch.randn(10, D_MODEL, generator=g), name="wide")
    d = other.W_dec[4].double()
    v = rotation_vector(approx, sae, 4, lam=0.0, source_sae=other, rotation=R).layers[3]
    assert torch.allclose(v.double(), Q @ d / d.norm(), atol=1e-5)
    prov = rotation_vector(approx, sae, 4, source_sae=other).provenance
    assert prov["feature_sae"] == "wide" and prov["feature"] == 4 and prov["sae"] == "toy-sae"
    with pytest.raises(ValueError, match="measuring one"):
        rotation_matrix(approx, other)


def test_rotation_with_identity_like_c():
    # W_dec = M^T with orthonormal-ish rows -> C = M_n M_n^T is symmetric positive definite -> R = I.
    g = torch.Generator().manual_seed(3)
    W_dec = torch.randn(D_SAE, D_MODEL, generator=g)
    approx = EffectApproximator(W_dec.T.contiguous(), torch.zeros(D_SAE), layer=3)
    sae = toy_sae(W_dec)
    assert torch.allclose(rotation_matrix(approx, sae), torch.eye(D_MODEL, dtype=torch.float64), atol=1e-6)
    v = rotation_vector(approx, sae, 2).layers[3]  # zero bias: just the normalised decoder row
    assert torch.allclose(v, W_dec[2] / W_dec[2].norm(), atol=1e-6)


# ---------------------------------------------------------------------- files


def test_approximator_save_load_round_trip(tmp_path):
    X, Y, _, _ = synthetic(n=200)
    approx = EffectApproximator.fit_least_squares(X, Y, layer=3, sae="toy-sae", model="toy-model")
    approx.meta["metrics"] = {"test": {"r2": 0.5}}
    path = approx.save(tmp_path / "a.safetensors")
    loaded = EffectApproximator.load(path)
    assert torch.equal(loaded.M, approx.M) and torch.equal(loaded.b, approx.b)
    assert (loaded.layer, loaded.sae, loaded.model) == (3, "toy-sae", "toy-model")
    assert loaded.meta == approx.meta and loaded.sha256 == approx.sha256
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary file left
    save_file({"M": torch.zeros(2, 3), "b": torch.zeros(3)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(EffectsFileError, match="no vsteer.approximator metadata"):
        EffectApproximator.load(tmp_path / "bare.safetensors")
    with pytest.raises(EffectsFileError, match="no such approximator"):
        EffectApproximator.load(tmp_path / "missing.safetensors")


def test_effects_round_trip(tmp_path):
    X, Y, _, _ = synthetic(n=50)
    scales = torch.linspace(10, 60, 50)
    path = save_effects(tmp_path / "run", X, Y, {**META, "rollouts": 896}, scales=scales)
    assert path == tmp_path / "run" / "effects.safetensors"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["effects.safetensors"]
    data = load_effects(tmp_path / "run")
    assert torch.equal(data.X, X) and torch.equal(data.Y, Y) and torch.equal(data.scales, scales)
    assert (data.layer, data.sae, data.model, data.n, data.d_model, data.d_sae) == (3, "toy-sae", "toy-model", 50, D_MODEL, D_SAE)
    assert data.meta["rollouts"] == 896 and data.meta["format_version"] == 1 and data.meta["n"] == 50
    # The file path works too, and scales are optional.
    save_effects(tmp_path / "b.safetensors", X.double(), Y, {**META, "model": None})
    other = load_effects(tmp_path / "b.safetensors")
    assert other.scales is None and other.model is None and other.X.dtype == torch.float32


def test_effects_errors(tmp_path):
    X, Y, _, _ = synthetic(n=10)
    with pytest.raises(EffectsFileError, match="no effects.safetensors"):
        load_effects(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "effects.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EffectsFileError, match="not a safetensors file"):
        load_effects(tmp_path / "junk")
    save_file({"directions": X, "effects": Y}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(EffectsFileError, match="no vsteer.effects metadata") as info:
        load_effects(tmp_path / "nometa.safetensors")
    assert info.value.key == "vsteer.effects"
    save_file({"directions": X}, str(tmp_path / "noY.safetensors"), metadata={"vsteer.effects": json.dumps(META)})
    with pytest.raises(EffectsFileError, match="missing tensor 'effects'"):
        load_effects(tmp_path / "noY.safetensors")
    save_file({"directions": X, "effects": Y}, str(tmp_path / "bad.safetensors"),
              metadata={"vsteer.effects": json.dumps({**META, "d_sae": 99})})
    with pytest.raises(EffectsFileError, match="d_sae=99"):
        load_effects(tmp_path / "bad.safetensors")
    with pytest.raises(EffectsFileError, match="lacks \\['sae'\\]"):
        save_effects(tmp_path / "x", X, Y, {"layer": 3, "model": None})
    with pytest.raises(EffectsFileError, match="rows"):
        save_effects(tmp_path / "x", X, Y[:5], META)
    with pytest.raises(EffectsFileError, match="NaN"):
        save_effects(tmp_path / "x", X, Y.clone().fill_(float("nan")), META)
    with pytest.raises(EffectsFileError, match="all zeros"):
        save_effects(tmp_path / "x", torch.zeros_like(X), Y, META)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ---------------------------------------------------------------------- report


def test_top_effects_table():
    y = torch.tensor([0.1, 4.5819, -2.0, 1.3763])
    assert top_effects_table(y, k=2) == "| Act diff | Feature id |\n|---:|---:|\n| 4.5819 | 1 |\n| 1.3763 | 3 |"
    table = top_effects_table(y, k=1, feature_labels={1: "No clear | pattern"})
    assert table.splitlines()[-1] == "| 4.5819 | 1 | No clear \\| pattern |"
    assert top_effects_table(y, k=1, largest=False).splitlines()[-1] == "| -2.0000 | 2 |"


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    X, Y, M, b = synthetic(n=40)
    assert plot_effect_heatmap(Y[:6], tmp_path / "h.png", k=5, row_labels=list("abcdef")).stat().st_size > 0
    assert plot_approximator_fit(Y, X @ M + b, tmp_path / "f.png").stat().st_size > 0


# ---------------------------------------------------------------------- CLI


@pytest.fixture
def cli_env(tmp_path):
    X, Y, _, _ = synthetic(n=400)
    save_effects(tmp_path / "run", X, Y, META)
    W_dec = torch.randn(D_SAE, D_MODEL, generator=torch.Generator().manual_seed(5))
    save_sae(toy_sae(W_dec, name="toy-sae"), tmp_path / "sae")
    env = {"VSTEER_VECTOR_STORE": str(tmp_path / "vectors"), "VSTEER_SAE_STORE": str(tmp_path / "saes")}
    return tmp_path, env


def test_cli_fit_and_target(cli_env):
    tmp_path, env = cli_env
    runner = CliRunner()
    out = tmp_path / "approx.safetensors"
    result = runner.invoke(effects, ["fit", str(tmp_path / "run"), "--out", str(out), "--method", "lstsq",
                                     "--test-fraction", "0.1"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["held_out"]["r2"] > 0.999 and report["held_out"]["n"] == 40
    assert (tmp_path / "approx.fit.png").is_file()
    approx = EffectApproximator.load(out)
    assert approx.layer == 3 and approx.meta["metrics"]["test"]["n"] == 40

    result = runner.invoke(effects, ["fit", str(tmp_path / "run"), "--out", str(tmp_path / "adam.safetensors"),
                                     "--epochs", "2", "--lr", "0.01", "--no-plot"], env=env)
    assert result.exit_code == 0, result.output
    assert EffectApproximator.load(tmp_path / "adam.safetensors").meta["fit"]["epochs"] == 2
    assert not (tmp_path / "adam.fit.png").exists()

    v_path = tmp_path / "v.safetensors"
    result = runner.invoke(effects, ["target", "--approximator", str(out), "--feature", "5", "--output", str(v_path),
                                     "--name", "toy-target"], env=env)
    assert result.exit_code == 0, result.output
    vector = load_vector(v_path)
    assert result.stdout.strip() == vector.sha256
    assert torch.allclose(vector.layers[3], targeted_vector(approx, 5).layers[3])
    store = VectorStore(tmp_path / "vectors")
    assert store.resolve("toy-target") == vector.sha256

    for variant in ("pinv", "rotation"):
        result = runner.invoke(effects, ["target", "--approximator", str(out), "--sae", str(tmp_path / "sae"),
                                         "--feature", "5", "--variant", variant, "--output", str(v_path)], env=env)
        assert result.exit_code == 0, result.output
        vector = load_vector(v_path)
        assert vector.method == f"sae-ts-{variant}" and vector.provenance["sae"] == "toy-sae"  # the config name of a path-loaded SAE
        assert "sae_sha256" in vector.provenance


def test_cli_target_errors(cli_env):
    tmp_path, env = cli_env
    out = tmp_path / "approx.safetensors"
    X, Y, _, _ = synthetic(n=100)
    EffectApproximator.fit_least_squares(X, Y, layer=3).save(out)
    runner = CliRunner()
    result = runner.invoke(effects, ["target", "--approximator", str(out), "--feature", "1", "--variant", "rotation",
                                     "--output", str(tmp_path / "v.safetensors")], env=env)
    assert result.exit_code == 1 and "--sae: the rotation variant needs the measuring SAE" in str(result.exception)
    result = runner.invoke(effects, ["target", "--approximator", str(out), "--feature", "99",
                                     "--output", str(tmp_path / "v.safetensors")], env=env)
    assert result.exit_code == 1 and "out of range" in str(result.exception)
    result = runner.invoke(effects, ["target", "--approximator", str(out), "--feature", "x:1",
                                     "--output", str(tmp_path / "v.safetensors")], env=env)
    assert result.exit_code == 1 and "ID:WEIGHT" in str(result.exception)
    result = runner.invoke(effects, ["fit", str(tmp_path / "run"), "--out", str(out), "--test-fraction", "1.5"], env=env)
    assert result.exit_code == 1 and "--test-fraction" in str(result.exception)
