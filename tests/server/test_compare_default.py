"""`"steering_compare": true` on a server with --default-steering and a tenant: the default is the
steered half, and the unsteered half takes no steering config. Its own module (and server), outside
shared_server/, whose server has no default."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import serve_process
from tests.server.shared_server.test_compare import MODEL, PROMPT, _post, _spec, _text

KEY = "sk-compare-tenant-key"


@pytest.fixture(scope="module")
def default_server(model_path, eager_llm, directions, tmp_path_factory):
    """A server with --default-steering and a tenant allowed one steering config at a time."""
    folder = tmp_path_factory.mktemp("serve-compare-default")
    (folder / "default.json").write_text(json.dumps(_spec(directions)))
    (folder / "tenants.json").write_text(json.dumps({"tenants": {"t": {"keys": [KEY], "max_configs_in_flight": 1}}}))
    yield from serve_process(model_path, folder / "server.log",
                             ("--default-steering", str(folder / "default.json"), "--tenants", str(folder / "tenants.json")),
                             store=eager_llm.store.root, served_model_name=MODEL)


def test_the_default_steering_is_compared_and_a_tenant_is_served(default_server):
    """No "steering" key: the server's default is the steered half; the unsteered half takes no
    steering config, so a tenant limited to one config in flight is served."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    with httpx.Client(base_url=default_server, timeout=180, headers={"Authorization": f"Bearer {KEY}"}) as tenant:
        by_default = _post(tenant, "/v1/completions", body)
        plain = _post(tenant, "/v1/completions", {**body, "steering": None})
        both = _post(tenant, "/v1/completions", {**body, "steering_compare": True})
        assert _text(by_default) != _text(plain)
        assert _text(both) == _text(by_default) and both["unsteered"]["choices"][0]["text"] == _text(plain)
        refused = tenant.post("/v1/completions", json={**body, "steering": None, "steering_compare": True})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "steering_compare", refused.text
        assert httpx.post(default_server + "/v1/completions", json={**body, "steering_compare": True},
                          timeout=60).status_code == 401  # without the key: refused like any request
