"""Stock vLLM steers through vsteer's plugins: the engine-argument hook (every vLLM process) and an
offline ``vllm.LLM`` started with ``additional_config={"vsteer": ...}``. The stock server with the
HTTP edge plugin is the server of tests/server/tenant_server."""

from __future__ import annotations

import os
from importlib.metadata import entry_points

import pytest
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.usage.usage_lib import UsageContext

from vsteer._errors import EngineError, SpecError
from vsteer.engine.config import SteeringEngineConfig
from vsteer.engine.edge_seal import SECRET_ENV
from vsteer.engine.plugin import SCHEDULER, WORKERS, steer_engine_args
from vsteer.server.middleware import CONFIG_ENV, shared_resolver
from vsteer.server.tenants import TENANTS_ENV


_KEEP: list = []


@pytest.fixture
def edge_env(monkeypatch):
    """The edge's environment, restored afterwards: a server's hook writes os.environ itself, which
    monkeypatch would not undo, and a leaked $VSTEER_TENANTS would reach later servers."""
    saved = dict(os.environ)
    for name in (CONFIG_ENV, SECRET_ENV, TENANTS_ENV, "VLLM_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    monkeypatch.undo()  # first: it would restore values the hook wrote before a test's own setenv
    os.environ.clear()
    os.environ.update(saved)
    shared_resolver.cache_clear()


def _args(model_path, vsteer=None, **kw) -> EngineArgs:
    extra = {} if vsteer is None else {"vsteer": vsteer}
    return EngineArgs(model=model_path, additional_config=extra, **kw)


def test_both_entry_points_are_installed():
    assert {e.value for e in entry_points(group="vllm.general_plugins") if e.name == "vsteer"} == {"vsteer.engine.plugin:register"}
    assert {e.value for e in entry_points(group="vllm.endpoint_plugins") if e.name == "vsteer"} == {
        "vsteer.server.plugin:SteeringEndpointPlugin"}
    from vsteer.engine.plugin import register

    register()  # vLLM loaded it already in this process; a second call must not wrap twice
    assert getattr(EngineArgs.create_engine_config, "__vsteer_wrapped__", False)
    assert not getattr(EngineArgs.create_engine_config.__wrapped__, "__vsteer_wrapped__", False)


def test_engines_without_vsteer_settings_are_untouched(model_path):
    args = _args(model_path)
    steer_engine_args(args, UsageContext.LLM_CLASS)
    assert args.worker_cls == "auto" and args.scheduler_cls is None and args.additional_config == {}


def test_settings_become_the_engine_configuration(model_path, tmp_path):
    args = _args(model_path, {"vector_store": str(tmp_path), "max_slots": 3, "condition_layers": [6, 6]}, enforce_eager=True)
    steer_engine_args(args, UsageContext.LLM_CLASS)
    assert args.worker_cls == WORKERS["cpu"] and args.scheduler_cls == SCHEDULER
    config = SteeringEngineConfig.from_vllm(args.additional_config)
    assert (config.max_slots, config.store, config.condition_layers, config.capture_layers) == (3, str(tmp_path), [6], [])
    assert not config.edge  # an offline engine trusts its caller
    before = dict(args.additional_config)
    steer_engine_args(args, UsageContext.LLM_CLASS)  # already a steering engine: left as it is
    assert args.additional_config == before


@pytest.mark.parametrize("settings, kwargs, message", [
    ({"max_slots": 0}, {}, "vsteer'].max_slots"),
    ({"max_slot": 4}, {}, "vsteer'].max_slot"),
    ({"max_abs_scale": float("inf")}, {}, "vsteer'].max_abs_scale"),
    ({"condition_layers": [99]}, {}, "vsteer'].condition_layers"),
    ({"effect_saes": ["nope"]}, {}, "vsteer'].effect_saes"),
    ({}, {"enable_sleep_mode": True}, "sleep mode"),
    ({}, {"prefill_context_parallel_size": 2}, "prefill context parallelism"),
    ({}, {"worker_cls": "my.Worker"}, "drop --worker-cls"),
])
def test_bad_settings_are_refused_naming_the_field(model_path, tmp_path, settings, kwargs, message):
    args = _args(model_path, {"vector_store": str(tmp_path), **settings}, **kwargs)
    with pytest.raises(EngineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        steer_engine_args(args, UsageContext.LLM_CLASS)


def test_a_server_steers_only_behind_the_edge(model_path, tmp_path, edge_env):
    with pytest.raises(EngineError, match="VLLM_PLUGINS=vsteer"):
        steer_engine_args(_args(model_path, {"vector_store": str(tmp_path)}), UsageContext.OPENAI_API_SERVER)
    edge_env.setenv("VLLM_PLUGINS", "other,vsteer")
    args = _args(model_path, {"vector_store": str(tmp_path), "max_abs_scale": 5.0})
    steer_engine_args(args, UsageContext.OPENAI_API_SERVER)
    assert SteeringEngineConfig.from_vllm(args.additional_config).edge
    import json

    assert os.environ[SECRET_ENV] and json.loads(os.environ[CONFIG_ENV])["max_abs_scale"] == 5.0
    bad = _args(model_path, {"vector_store": str(tmp_path), "default_steering": {"interventions": [{"op": "nope"}]}})
    with pytest.raises(Exception, match="--default-steering"):
        steer_engine_args(bad, UsageContext.OPENAI_API_SERVER)


def test_tenants_are_checked_whole_at_start_from_the_settings_or_the_environment(model_path, tmp_path, edge_env):
    """``tenants`` (a file) or ``$VSTEER_TENANTS`` (the file's JSON text or its path) is checked
    before the engine starts, names and keys included, and reaches the edge as JSON text."""
    import json

    edge_env.setenv("VLLM_PLUGINS", "vsteer")
    good = {"tenants": {"ann": {"keys": ["sk-ann"]}, "ben": {"keys": ["sk-ben"], "max_vectors": 3}}}
    (tmp_path / "t.json").write_text(json.dumps(good))
    for settings, env in (({"tenants": str(tmp_path / "t.json")}, None), ({}, str(tmp_path / "t.json")),
                          ({}, json.dumps(good))):
        if env is None:
            edge_env.delenv(TENANTS_ENV, raising=False)
        else:
            edge_env.setenv(TENANTS_ENV, env)
        steer_engine_args(_args(model_path, {"vector_store": str(tmp_path / "store"), **settings}),
                          UsageContext.OPENAI_API_SERVER)
        assert json.loads(os.environ[TENANTS_ENV])["tenants"]["ben"]["max_vectors"] == 3
    shared_key = {"tenants": {"ann": {"keys": ["sk-same"]}, "ben": {"keys": ["sk-same"]}}}
    for bad in (shared_key, {"tenants": {"bad name!": {"keys": ["k"]}}}, {"tenants": {"ann": {}}}):
        edge_env.setenv(TENANTS_ENV, json.dumps(bad))
        with pytest.raises(SpecError, match="tenants"):
            steer_engine_args(_args(model_path, {"vector_store": str(tmp_path / "store")}), UsageContext.OPENAI_API_SERVER)
    edge_env.setenv(TENANTS_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(SpecError, match="missing.json"):
        steer_engine_args(_args(model_path, {"vector_store": str(tmp_path / "store")}), UsageContext.OPENAI_API_SERVER)


def test_stock_vllm_LLM_steers_like_vsteer_LLM(model_path, eager_llm, directions):
    """``vllm.LLM(..., additional_config={"vsteer": ...})`` is a steering engine; ``vsteer.LLM.from_vllm``
    steers it, and so do its ``steering_args`` in a request's own ``SamplingParams``."""
    import vllm

    from vsteer import LLM

    love = directions["love"].sha256
    spec = {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 8.0},
                              {"op": "ablate", "vector": directions["wedding"].sha256, "layers": [4, 5]}]}
    stock = vllm.LLM(model_path, additional_config={"vsteer": {"vector_store": str(eager_llm.store.root), "capture_layers": [12]}},
                     enforce_eager=True, dtype="float32", max_model_len=128, max_num_seqs=4,
                     kv_cache_memory_bytes=64 * 2**20)
    _KEEP.append(stock)  # never freed: in-process engines share vLLM's parallel state, which a shutdown tears down
    _edge_must_be_in_front(stock)
    steered = LLM.from_vllm(stock)
    prompts = ["I think that", "My best friend"]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)
    want = eager_llm.generate(prompts, greedy, steering=[spec, None])
    got = steered.generate(prompts, greedy, steering=[spec, None])
    plain = stock.generate(prompts, greedy)
    direct = stock.generate(prompts[0], SamplingParams(max_tokens=12, temperature=0.0, logprobs=1,
                                                       extra_args=steered.steering_args(spec)))[0]
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        diff = [abs(a[t].logprob - b[t].logprob) for a, b, t in zip(g.outputs[0].logprobs, w.outputs[0].logprobs,
                                                                     g.outputs[0].token_ids)]
        assert max(diff) < 1e-4
    assert direct.outputs[0].token_ids == want[0].outputs[0].token_ids != plain[0].outputs[0].token_ids
    assert plain[1].outputs[0].token_ids == want[1].outputs[0].token_ids
    sara = {"interventions": [{"op": "sara", "attract": "I love everyone.", "repel": "I hate everyone.", "layers": [12],
                               "scale": 1.0}]}
    with pytest.raises(SpecError, match="sara"):
        steered.steering_args(sara)
    assert steered.generate(prompts[0], greedy, steering=sara)[0].outputs[0].token_ids  # through vsteer.LLM it runs


def _edge_must_be_in_front(stock) -> None:
    """The endpoint plugin loads for every server task, and a steering server whose app did not get
    the edge (here: an app without vLLM's parsed arguments) refuses to start serving."""
    import asyncio

    from fastapi import FastAPI

    from vsteer.server.plugin import SteeringEndpointPlugin

    plugin = SteeringEndpointPlugin()
    assert plugin.required_tasks is None
    plugin.attach_router(FastAPI())
    with pytest.raises(EngineError, match="not put in front"):
        asyncio.run(plugin.init_state(stock.llm_engine, None, None))
    asyncio.run(SteeringEndpointPlugin().init_state(None, None, None))  # the render server: no engine, no edge


def test_a_registry_database_that_cannot_be_reached_stops_the_server_at_start(model_path, tmp_path, edge_env):
    from vsteer.server.process import free_port

    edge_env.setenv("VLLM_PLUGINS", "vsteer")
    edge_env.setenv("VSTEER_REGISTRY_TIMEOUT", "2")
    for url, message in ((f"postgresql://nobody@127.0.0.1:{free_port()}/none", "cannot connect to the registry"),
                         ("sqlite:///x.db", "postgresql:// URL")):
        edge_env.setenv("VSTEER_REGISTRY_URL", url)
        with pytest.raises(EngineError, match=message):
            steer_engine_args(_args(model_path, {"vector_store": str(tmp_path / "store")}), UsageContext.OPENAI_API_SERVER)


def test_vsteer_serve_keeps_the_other_installed_plugins():
    """Unset, $VLLM_PLUGINS loads every plugin; naming vsteer must not turn the others off."""
    from importlib.metadata import entry_points

    from vsteer.server.serve import allow_plugin

    eps = entry_points()
    installed = {ep.name for group in eps.groups if group.startswith("vllm.") for ep in eps.select(group=group)}
    assert {"vsteer", "lora_filesystem_resolver"} <= installed
    assert set(allow_plugin(None).split(",")) == installed
    assert allow_plugin("mine") == "mine,vsteer" and allow_plugin("vsteer,mine") == "vsteer,mine"
    assert allow_plugin("") == "vsteer"  # set and empty: no plugin but vsteer's
