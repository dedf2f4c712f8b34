"""``vsteer vectors``: list/show/import/export/rm through click's runner, and the real error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import vsteer.cli
from vsteer._errors import VectorFileError
from vsteer.cli.vectors import vectors
from vsteer.vectors import SteeringVector, VectorStore, load_vector, save_vector


def make(seed=0, **kwargs) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    layers = {4: torch.randn(8, generator=gen), 5: torch.randn(8, generator=gen), 9: torch.randn(8, generator=gen)}
    return SteeringVector.from_tensors(layers, **kwargs)


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(vectors, list(args), env=env)


@pytest.fixture
def files(tmp_path):
    a, b = make(seed=0, model="m", method="caa"), make(seed=1)
    save_vector(a, tmp_path / "a.safetensors")
    save_vector(b, tmp_path / "b.gguf", model_hint="llama")
    return a, b


def test_import_list_show(tmp_path, files):
    a, b = files
    store = str(tmp_path / "store")
    result = invoke("import", str(tmp_path / "a.safetensors"), "--name", "happy", "--model", "m", "--store", store)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == a.sha256
    result = invoke("import", str(tmp_path / "b.gguf"), "--store", store)
    assert result.exit_code == 0 and result.stdout.strip() == b.sha256

    result = invoke("list", "--store", store)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAMES", "SHA256", "MODEL", "HIDDEN", "LAYERS", "METHOD"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert rows[a.sha256[:12]] == ["happy", a.sha256[:12], "m", "8", "4-5,9", "caa"]
    assert rows[b.sha256[:12]] == ["-", b.sha256[:12], "-", "8", "4-5,9", "custom"]

    result = invoke("list", "--json", "--store", store)
    listed = {row["sha256"]: row for row in json.loads(result.stdout)}
    assert listed[a.sha256]["names"] == ["happy"] and listed[b.sha256]["provenance"] == {"gguf_model_hint": "llama"}

    result = invoke("show", "happy", "--store", store)
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["sha256"] == a.sha256 and info["layers"] == [4, 5, 9] and info["model"] == "m"
    assert info["path"] == str(VectorStore(store).path(a.sha256))


def test_store_from_the_environment(tmp_path, files):
    store = tmp_path / "env-store"
    result = invoke("import", str(tmp_path / "a.safetensors"), env={"VSTEER_VECTOR_STORE": str(store)})
    assert result.exit_code == 0, result.output
    assert VectorStore(store).list() == [files[0].sha256]


def test_default_store_is_under_the_cache(tmp_path, files):
    env = {"VSTEER_VECTOR_STORE": None, "VSTEER_CACHE": str(tmp_path / "cache")}
    result = invoke("import", str(tmp_path / "a.safetensors"), env=env)
    assert result.exit_code == 0, result.output
    assert VectorStore(tmp_path / "cache" / "vectors").list() == [files[0].sha256]


def test_import_refuses_another_model(tmp_path, files):
    result = invoke("import", str(tmp_path / "a.safetensors"), "--model", "other", "--store", str(tmp_path / "s"))
    assert result.exit_code == 1
    assert isinstance(result.exception, VectorFileError)
    assert "vector was computed for model m (hidden 8), not other" in str(result.exception)
    assert VectorStore(tmp_path / "s").list() == []


def test_export_gguf_and_back(tmp_path, files):
    a, _ = files
    store = str(tmp_path / "store")
    invoke("import", str(tmp_path / "a.safetensors"), "--name", "happy", "--store", store)
    result = invoke("export", "happy", str(tmp_path / "out.gguf"), "--store", store)
    assert isinstance(result.exception, VectorFileError) and "model_hint" in str(result.exception)
    result = invoke("export", "happy", str(tmp_path / "out.gguf"), "--model-hint", "llama", "--store", store)
    assert result.exit_code == 0, result.output
    back = load_vector(tmp_path / "out.gguf")
    assert back.sha256 == a.sha256
    result = invoke("export", a.sha256[:12], str(tmp_path / "x.safetensors"), "--store", store)
    assert isinstance(result.exception, VectorFileError)  # a short sha is not a ref


def test_rm(tmp_path, files):
    a, b = files
    store = str(tmp_path / "store")
    invoke("import", str(tmp_path / "a.safetensors"), "--name", "happy", "--store", store)
    invoke("import", str(tmp_path / "b.gguf"), "--name", "sad", "--store", store)
    result = invoke("rm", "--name-only", "sad", "--store", store)
    assert result.exit_code == 0
    assert VectorStore(store).names() == {"happy": a.sha256} and b.sha256 in VectorStore(store)
    result = invoke("rm", "happy", "--store", store)
    assert result.exit_code == 0
    assert VectorStore(store).list() == [b.sha256] and VectorStore(store).names() == {}
    result = invoke("rm", b.sha256, "--store", store)
    assert result.exit_code == 0 and VectorStore(store).list() == []
    result = invoke("rm", "happy", "--store", store)
    assert isinstance(result.exception, VectorFileError) and result.exception.key == "happy"


def test_show_unknown_ref_raises_the_vsteer_error(tmp_path):
    result = invoke("show", "nope", "--store", str(tmp_path))
    assert result.exit_code == 1
    assert isinstance(result.exception, VectorFileError)
    assert result.exception.key == "nope"


def test_help_lists_the_subcommands():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("list", "show", "import", "export", "rm"):
        assert name in result.stdout
    assert "VSTEER_VECTOR_STORE" in invoke("list", "--help").stdout


@pytest.mark.skipif(
    "vectors" not in vsteer.cli.cli.commands,
    reason="the vectors group is not registered in vsteer.cli yet",
)
def test_main_prints_the_error_line_and_exits_1(tmp_path):
    code = (
        "from vsteer.cli import main; import sys; "
        f"sys.exit(main(['vectors', 'show', 'nope', '--store', {str(tmp_path)!r}]))"
    )
    env = dict(os.environ, VSTEER_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("VectorFileError:")
    assert "Traceback" not in out.stderr
