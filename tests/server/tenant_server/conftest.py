"""One steering server (stock vLLM with vsteer's plugins) with tenants for every module in this folder; it stops after the last of them
(package scope; under xdist these modules are one group, tests/conftest.py: group_of).

Each module has tenants of its own (test_edge.py: alice and bob; test_tenants.py: carol and dave),
so that what one module's tenants upload or hold never shows in the other's checks. The store holds
two public vectors: "pub" (a random unit direction at layer 10) and "public-ones"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import harness_env, serve_process
from tests.server.tenant_server import MODEL, PUBLIC, TENANTS


@pytest.fixture(scope="package")
def tenant_store(tmp_path_factory) -> Path:
    """The server's vector store, with the operator's two public vectors."""
    from vsteer import SteeringVector
    from vsteer.vectors import VectorStore

    store = VectorStore(tmp_path_factory.mktemp("tenant-server") / "store")
    v = torch.randn(576, generator=torch.Generator().manual_seed(1))
    for name, direction in zip(PUBLIC, (v / v.norm(), torch.ones(576) / 24)):
        store.set_name(name, store.put(SteeringVector.from_tensors({10: direction})))
    return store.root


@pytest.fixture(scope="package")
def tenant_server_log(tmp_path_factory) -> Path:
    """Where the server writes its log."""
    return tmp_path_factory.mktemp("tenant-server-run") / "server.log"


@pytest.fixture(scope="package")
def tenant_server(model_path, tenant_store, tenant_server_log):
    """The base URL of the server (the tenants of __init__.py, a condition layer, prompt-token details in usage),
    started the stock way: vLLM's own server with vsteer's plugins, on Model Runner V2 with async
    scheduling, as on a GPU (the Triton-interpreter harness of tests/_site; tests/server/shared_server
    runs on V1, synchronously).
    Its engine carries the fault of tests/_faults.py: a request steered with scale FAULT_SCALE goes NaN."""
    root = tenant_server_log.parent
    (root / "tenants.json").write_text(json.dumps({"tenants": TENANTS}))
    yield from serve_process(model_path, tenant_server_log, vllm_args=["--enable-prompt-tokens-details", "--async-scheduling"],
                             store=tenant_store, served_model_name=MODEL,
                             env=harness_env(v2=True, async_scheduling=True, faults=True),
                             stock={"tenants": str(root / "tenants.json"), "condition_layers": [6]})
