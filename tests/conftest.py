"""Shared fixtures: the real default model, real vLLM engines (one eager, one compiled, float32).

Engines are expensive (eager ~5-10 s, compiled ~100 s on 2 CPU cores), so each kind is built once
per test session. Environment variables must be set before vLLM is imported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("VSTEER_CACHE", str(_REPO / ".cache" / "vsteer"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Engines in this process get a small KV cache through kv_cache_memory_bytes (ENGINE_KW); vLLM
# lets this variable override that, so it is kept only for the subprocesses tests start (SUBPROCESS_ENV).
_KV_GIB = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vsteer-vllm-cache-"))
# torch's inductor cache too is per run: its on-disk entries outlive a run, and torch 2.13 does not
# key them on ATEN_CPU_CAPABILITY, so a run under another kernel cap read wrong code from them.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.environ["VLLM_CACHE_ROOT"], "inductor"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

KV_BYTES = 256 * 2**20  # ~5,600 float32 tokens of SmolLM2: plenty for these tests
ENGINE_KW = dict(dtype="float32", max_model_len=512, max_num_seqs=32, enable_prefix_caching=True, kv_cache_memory_bytes=KV_BYTES)
#: layers where the shared engines pool prompts for conditional steering ("when")
CONDITION_LAYERS = [6, 12]


def subprocess_env() -> dict:
    """Environment for a `vsteer` subprocess: this one's, with a bounded KV cache."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": _KV_GIB}


def harness_env(*, v2: bool = False, faults: bool = False, async_scheduling: bool = False) -> dict[str, str]:
    """Variables that put a child process under the test harnesses of tests/_site: Model Runner V2
    through Triton's interpreter (``v2``), async scheduling for an engine that asks for it, on
    either runner (``async_scheduling``), and the NaN fault of tests/_faults.py (``faults``)."""
    site = str(_REPO / "tests" / "_site")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))}
    if v2:
        env["VSTEER_TEST_V2"] = "1"
    if async_scheduling:
        env["VSTEER_TEST_ASYNC"] = "1"
    if faults:
        env["VSTEER_TEST_FAULTS"] = "1"
    return env


#: vLLM's own API-server entry, which `vllm serve` runs (vllm-cpu's `vllm` command cannot start:
#: it looks up a distribution named "vllm")
STOCK_SERVER = "vllm.entrypoints.launchers.api_server.entry"


def start_serve(model_path, log: Path, vsteer_args=(), vllm_args=(), *, store, served_model_name: str = "smollm2",
                max_model_len: int = 512, max_num_seqs: int = 16, env: dict | None = None,
                stock: dict | None = None):
    """Start `vsteer serve` (eager, float32) on a free loopback port; returns (process, base URL).

    ``stock``: start stock vLLM's server instead, the way the README shows (``VLLM_PLUGINS=vsteer``,
    these settings in ``--additional-config '{"vsteer": ...}'``); ``vsteer_args`` must then be empty."""
    import json
    import subprocess
    import sys

    from vsteer.server.process import free_port, stop, wait_until_healthy

    port = free_port()
    # VSTEER_LOG=info: vLLM's full log in `log` (quiet mode would send it to the log file), so
    # checks of the log read everything the server logged.
    env = {**subprocess_env(), "VSTEER_VECTOR_STORE": str(store), "VSTEER_LOG": "info", **(env or {})}
    if stock is None:
        cmd = [sys.executable, "-m", "vsteer.cli", "serve", *vsteer_args, model_path]
    else:
        assert not vsteer_args, "stock vLLM takes vsteer's settings in --additional-config"
        env["VLLM_PLUGINS"] = "vsteer"
        cmd = [sys.executable, "-m", STOCK_SERVER, "--model", model_path, "--additional-config", json.dumps({"vsteer": stock})]
    cmd += ["--served-model-name", served_model_name, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs), *vllm_args]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, proc)
    except (RuntimeError, TimeoutError) as exc:
        stop(proc)
        raise AssertionError(f"{exc}:\n{log.read_text()[-3000:]}") from exc
    return proc, base


def serve_process(model_path, log: Path, extra_args=(), *, store, served_model_name: str, max_model_len: int = 512,
                  max_num_seqs: int = 16, vllm_args=(), env: dict | None = None, stock: dict | None = None):
    """Run `vsteer serve` (see :func:`start_serve`); yields its base URL, stops it afterwards, and
    checks no API key reached its log."""
    from vsteer.server.process import stop

    proc, base = start_serve(model_path, log, extra_args, vllm_args, store=store, served_model_name=served_model_name,
                             max_model_len=max_model_len, max_num_seqs=max_num_seqs, env=env, stock=stock)
    yield base
    stop(proc)
    assert b"sk-" not in log.read_bytes(), "an API key reached the server log"


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server (tests/_postgres.py), one per test session (per xdist worker)."""
    from tests._postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def registry_url(postgres) -> str:
    """A fresh, empty registry database on the session's PostgreSQL server."""
    return postgres.new_database()


@pytest.fixture(scope="session")
def model_path() -> str:
    from vsteer.models import prepare_default_model

    return str(prepare_default_model())


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vector-store")


#: SAEs the shared engines load (built from real activations at session start; see test_saes.py)
TEST_SAES = ["test-relu", "test-jumprelu", "test-topk"]


@pytest.fixture(scope="session")
def sae_store_dir(tmp_path_factory, hf_model, tokenizer, model_path) -> Path:
    from tests._reference.test_saes import build_test_saes
    from vsteer.models import model_info
    from vsteer.sae import SaeStore

    root = tmp_path_factory.mktemp("sae-store")
    store = SaeStore(root)
    for name, sae in build_test_saes(hf_model, tokenizer, model_info(model_path).name).items():
        store.add(name, sae)
    return root


@pytest.fixture(scope="session")
def eager_llm(model_path, store_dir, sae_store_dir):
    from vsteer.engine.llm import LLM

    return LLM(model_path, enforce_eager=True, store=store_dir, saes=TEST_SAES, sae_store=sae_store_dir,
               effect_saes=["test-relu"], condition_layers=CONDITION_LAYERS, **ENGINE_KW)


@pytest.fixture(scope="session")
def compiled_llm(model_path, store_dir, sae_store_dir):
    from vsteer.engine.llm import LLM

    # A 512-token step budget (vLLM's CPU default is 4096): vLLM's warm-up run of the compiled engine
    # is one step of that size (its "Initial profiling/warmup run took" log line read 9.0 s at 4096
    # and 1.05 s at 512 on a 2-core AVX-512 machine); a longer step is chunked, which must not
    # change any result.
    return LLM(model_path, enforce_eager=False, store=store_dir, saes=TEST_SAES, sae_store=sae_store_dir,
               effect_saes=["test-relu"], condition_layers=CONDITION_LAYERS, max_num_batched_tokens=512, **ENGINE_KW)


@pytest.fixture(scope="session")
def few_slots_llm(model_path, store_dir, sae_store_dir):
    """Three slots and a 64-feature SAS budget: requests must wait for both."""
    from vsteer.engine.llm import LLM

    return LLM(model_path, enforce_eager=True, store=store_dir, max_slots=3, saes=["test-relu"],
               sae_store=sae_store_dir, max_sas_support=64, condition_layers=CONDITION_LAYERS, **ENGINE_KW)


@pytest.fixture(scope="session")
def plain_vllm(model_path):
    """Plain vLLM, no vsteer worker, scheduler or layers. Engines are never deleted during the
    session: in one process they share vLLM's global parallel state, which a shutdown tears down."""
    import vllm

    return vllm.LLM(model=model_path, enforce_eager=True, **ENGINE_KW)


@pytest.fixture(scope="session")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def directions(eager_llm):
    """Unit directions at every layer from real captured activations (love - hate, etc.)."""
    from vsteer.methods import mean_difference

    layers = list(range(eager_llm.model_shape.num_layers))
    love = mean_difference(eager_llm, ["I love you so much.", "What a wonderful, kind friend."],
                           ["I hate you so much.", "What an awful, cruel enemy."], layers).normalized()
    wedding = mean_difference(eager_llm, ["The wedding ceremony and the bride.", "We got married in church."],
                              ["The tax report and the audit.", "We filed the paperwork."], layers).normalized()
    for v in (love, wedding):
        eager_llm.store.put(v)  # every test engine shares this store
    return {"love": love, "wedding": wedding}


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, model_path) -> Path:
    """A tiny random LoRA adapter for the default model (tests/_reference/lora.py)."""
    from tests._reference.lora import build_adapter

    return build_adapter(model_path, tmp_path_factory.mktemp("lora-adapter"))


@pytest.fixture(scope="module")
def peft_model(model_path, adapter_dir):
    """The default model in HF with that adapter (peft); per module, so a worker does not keep it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


#: modules that build in-process engines of their own (besides the session's eager one), or the
#: compiled engine, the few-slots engine or plain vLLM: under xdist they run on one worker, so those
#: engines (which a process never frees) exist once per run
ENGINE_MODULES = ("tests/engine/test_architectures.py", "tests/engine/test_batching.py",
                  "tests/engine/test_conditions.py", "tests/engine/test_exactness.py",
                  "tests/engine/test_plugin.py", "tests/engine/test_preemption.py", "tests/engine/test_sas_engine.py",
                  "tests/engine/test_vllm_features.py")
#: folders whose modules share one server (package scope): one group each
SHARED_SERVERS = ("tests/server/tenant_server/", "tests/server/shared_server/")
#: modules that start a local Ray cluster: one at a time
RAY_MODULES = ("tests/effects/test_effects_ray.py", "tests/jobs/test_ray_pool.py", "tests/deploy/test_ray_serve.py")
#: groups in the order workers take them: the longest first (measured with --durations), so no
#: worker is left alone with a long one at the end; the server groups (which the "engines" worker
#: never takes) before the other long ones, which that worker takes once its engines are done.
#: An entry ending in "/" stands for every group under that folder.
FIRST_GROUPS = ("engines", "tests/test_readme.py", "ray", "tests/engine/test_runner_v2.py", *SHARED_SERVERS, "tests/server/",
                "tests/test_cli.py", "tests/sae/test_sae_train.py", "tests/jobs/test_rollouts.py",
                "tests/effects/test_effects_cli.py", "tests/eval/test_eval_harness.py")
#: modules that start `vsteer serve` (a server and its engine process, ~3.5 GB)
SERVER_MODULES = ("tests/server/",)


def group_of(nodeid: str) -> str:
    """The group a test runs in under xdist: "engines", "ray", a shared server's folder, or its module's path."""
    path = nodeid.split("::")[0]
    shared = next((folder for folder in SHARED_SERVERS if path.startswith(folder)), None)
    if shared:
        return shared
    return "engines" if path in ENGINE_MODULES else "ray" if path in RAY_MODULES else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n 2`` (``make test``) a worker takes a whole group (see :func:`group_of`), so
    module-scoped engines and servers start once and only the session's eager engine is built on
    both workers. The worker holding the "engines" group (~11 GB) takes no group that starts a
    server or Ray cluster, so the two workers stay within 24 GB. (xdist's own ``--dist loadgroup``
    marks do not group tests under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            if "engines" in self.assigned_work.get(node, {}):
                light = [g for g in self.workqueue if g != "ray" and not g.startswith(SERVER_MODULES)]
                if not light:
                    return  # the other worker takes the rest
                self.workqueue.move_to_end(light[0], last=False)
            super()._assign_work_unit(node)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Run the groups longest first; every test marked ``compiled`` or ``ray`` is in its group."""
    for item in items:
        group = group_of(item.nodeid)
        assert not item.get_closest_marker("compiled") or group == "engines", f"{item.nodeid}: add to ENGINE_MODULES"
        assert not item.get_closest_marker("ray") or group == "ray", f"{item.nodeid}: add to RAY_MODULES"
    def rank(group: str) -> int:
        return next((i for i, first in enumerate(FIRST_GROUPS) if group == first or
                     (first.endswith("/") and group.startswith(first))), len(FIRST_GROUPS))

    items.sort(key=lambda item: rank(group_of(item.nodeid)))
