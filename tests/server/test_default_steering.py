"""`vsteer serve --default-steering`: requests with no "steering" key get the server's spec, a
request's own spec replaces it, and "steering": null turns it off; a bad default stops the server
before the engine starts, naming the option and the field.

This server keeps its registry in PostgreSQL ($VSTEER_REGISTRY_URL) with an empty store folder of
its own, so its edge and its engine read every vector from the database."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from vllm import SamplingParams

from tests.conftest import serve_process, subprocess_env

MODEL = "smollm2"
PROMPT = "I think that"


def _spec(directions, name: str, scale: float) -> dict:
    return {"interventions": [{"op": "add", "vector": directions[name].sha256, "layers": [10], "scale": scale}]}


@pytest.fixture(scope="module")
def registry(postgres, eager_llm, directions, tmp_path_factory):
    """The server's registry database, holding the session's vectors; returns its URL."""
    from vsteer.vectors._pg_store import PgVectorStore

    url = postgres.new_database()
    PgVectorStore(tmp_path_factory.mktemp("seed-cache"), url).import_folder(eager_llm.store)
    return url


@pytest.fixture(scope="module")
def server(model_path, registry, directions, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-default")
    (folder / "default.json").write_text(json.dumps(_spec(directions, "love", 12.0)))
    yield from serve_process(model_path, folder / "server.log", ("--default-steering", str(folder / "default.json")),
                             store=folder / "store", served_model_name=MODEL, env={"VSTEER_REGISTRY_URL": registry})


def _complete(base: str, **extra) -> str:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **extra}
    reply = httpx.post(base + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_default_own_spec_and_null(server, eager_llm, directions):
    default, own = _spec(directions, "love", 12.0), _spec(directions, "wedding", 12.0)
    want = eager_llm.generate([PROMPT] * 3, SamplingParams(max_tokens=12, temperature=0.0), steering=[default, own, None])
    default_text, own_text, plain_text = (o.outputs[0].text for o in want)
    assert len({default_text, own_text, plain_text}) == 3, "the three settings must differ for this test to mean anything"
    assert _complete(server) == default_text  # no "steering" key: the server's default
    assert _complete(server, steering=own) == own_text  # a request's own spec replaces it (no composing)
    assert _complete(server, steering=None) == plain_text  # "steering": null turns it off
    assert _complete(server, vllm_xargs={"steering": "null"}) == plain_text  # the same through vllm_xargs


def test_default_applies_to_chat(server):
    messages = [{"role": "user", "content": "Describe your neighbour in one sentence."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0}
    by_default = httpx.post(server + "/v1/chat/completions", json=body, timeout=120).json()
    unsteered = httpx.post(server + "/v1/chat/completions", json={**body, "steering": None}, timeout=120).json()
    assert by_default["choices"][0]["message"]["content"] != unsteered["choices"][0]["message"]["content"]


@pytest.mark.parametrize("content, expected", [
    ('{"interventions": [{"op": "add", "vector": "no-such-vector", "layers": [10]}]}', "interventions.0.vector"),
    ('{"interventions": [{"op": "add", "vector": [0.0], "layers": [99]}]}', "interventions.0"),
    ("{not json", "not a JSON steering spec"),
])
def test_bad_default_stops_the_server_before_the_engine_starts(content, expected, model_path, eager_llm, tmp_path):
    spec = tmp_path / "default.json"
    spec.write_text(content)
    env = {**subprocess_env(), "VSTEER_VECTOR_STORE": str(eager_llm.store.root)}
    proc = subprocess.run([sys.executable, "-m", "vsteer.cli", "serve", model_path, "--default-steering", str(spec),
                           "--port", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--default-steering" in proc.stderr and expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "EngineCore" not in proc.stderr + proc.stdout, "the engine started before the default was checked"


def test_the_defaults_vector_cannot_be_deleted_while_it_serves(server, directions):
    reply = httpx.delete(server + f"/v1/vectors/{directions['love'].sha256}", timeout=30)
    assert reply.status_code == 409 and "--default-steering" in reply.text, reply.text
    assert httpx.get(server + f"/v1/vectors/{directions['love'].sha256}", timeout=30).status_code == 200


def test_a_non_object_vllm_xargs_is_a_client_error(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "vllm_xargs": "not an object"}
    reply = httpx.post(server + "/v1/completions", json=body, timeout=120)
    assert 400 <= reply.status_code < 500, reply.text


def test_uploads_and_deletes_go_to_the_database(server, registry, eager_llm, directions, tmp_path):
    """What the HTTP registry writes is what another replica (another cache folder) reads."""
    from vsteer import save_vector
    from vsteer.vectors._pg_store import PgVectorStore

    elsewhere = PgVectorStore(tmp_path / "elsewhere", registry)
    save_vector(directions["wedding"], tmp_path / "w.safetensors")
    sha = directions["wedding"].sha256
    up = httpx.post(server + "/v1/vectors", params={"name": "wedding-db"}, content=(tmp_path / "w.safetensors").read_bytes())
    assert up.status_code == 201, up.text
    assert elsewhere.resolve("wedding-db") == sha
    spec = {"interventions": [{"op": "add", "vector": "wedding-db", "layers": [10], "scale": 12.0}]}
    want = eager_llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0), steering=[
        {"interventions": [{**spec["interventions"][0], "vector": sha}]}])[0].outputs[0].text
    assert _complete(server, steering=spec) == want
    elsewhere.remove_name("wedding-db")  # another replica's operator removes the name
    gone = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "steering": spec}, timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "interventions.0.vector"
