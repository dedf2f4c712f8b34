"""One steering server for every module in this folder, stock vLLM's own server with vsteer's
plugins started the stock way (tests/server/test_default_steering.py, test_compare_default.py and
test_upload_crash.py start `vsteer serve`, the convenience over the same path); it stops after the
last of them (package scope; under xdist these modules are one group, tests/conftest.py: group_of).

Its settings are what these modules need together: an SAE (SAE and SAS steering), a condition layer
(gated steering) and 1,024 tokens of context (the judge's prompts). No default steering and no
tenants, so a request can carry no steering at all and needs no key."""

from __future__ import annotations

import pytest

from tests.conftest import serve_process

MODEL = "smollm2"  # the tests use this name


@pytest.fixture(scope="package")
def server(model_path, eager_llm, directions, sae_store_dir, tmp_path_factory):
    """The base URL of the shared server; it reads the session's vector store (``directions`` in it)."""
    yield from serve_process(model_path, tmp_path_factory.mktemp("serve") / "server.log", store=eager_llm.store.root,
                             served_model_name=MODEL, max_model_len=1024,
                             stock={"saes": ["test-relu"], "sae_store": str(sae_store_dir), "condition_layers": [6]})
