"""``vsteer.LLM``: vLLM's offline ``LLM`` with per-request steering and activation capture."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file

from vsteer._cpu import chosen_dtype
from vsteer._errors import EngineError, SpecError
from vsteer.engine.config import ADDITIONAL_CONFIG_KEY, SteeringEngineConfig
from vsteer.engine.plugin import SCHEDULER as _SCHEDULER, WORKERS as _WORKERS, SteeringSettings, engine_setup
from vsteer.engine.plan import EXTRA_ARGS_KEY, ModelShape, SteeringPlan, resolve_spec
from vsteer.engine.compat import refuse_unsupported_kwargs
from vsteer.engine.request_args import CAPTURE_ARGS_KEY
from vsteer.models import model_info, resolve_model
from vsteer.spec import DEFAULT_MAX_ABS_SCALE
from vsteer.vectors import SteeringVector, load_vector
from vsteer.vectors._pg_store import open_store

#: KV cache on CPU when neither kv_cache_memory_bytes, gpu_memory_utilization nor
#: VLLM_CPU_KVCACHE_SPACE says otherwise.
DEFAULT_CPU_KV_BYTES = 4 * 2**30


class LLM:
    """A vLLM engine whose requests each carry their own steering.

    Args:
        model: "smollm2" (the embedded default model) or a local HF model folder.
        max_slots: distinct steering transforms resident at once (default: vLLM's resolved
            ``max_num_seqs``, capped so the slot banks stay within 1 GiB; see ``SteeringEngineConfig``).
            Requests that need more wait until slots free.
        max_ablation_rank: ablations per layer one request may compose.
        steerable_layers: decoder layers to wrap (default all).
        capture_layers: layers ``capture`` can read (default all steerable layers).
        store: vector-store folder (default ``$VSTEER_VECTOR_STORE`` or ``<cache>/vectors``).
        saes: SAEs for the ``sas`` op: names in the SAE store (``vsteer sae list``) or paths to
            SAE files/folders; one per layer. ``sae:<name>/<feature>`` references need no
            loaded SAE.
        max_sas_support: features one SAE layer may touch per step (union of the step's sas
            vector supports; ReLU/JumpReLU). Requests beyond it wait.
        sae_store: SAE-store folder (default ``$VSTEER_SAE_STORE`` or ``<cache>/saes``).
        effect_saes: names among ``saes`` whose layer sums SAE codes per request during
            generation, for feature-effect measurement (``vsteer.effects``).
        condition_layers: layers where conditional steering (``"when"``) may read the prompt;
            each costs a little work per step (see ``SteeringEngineConfig.condition_layers``).
        max_conditions: conditions (and distinct gates) one request may carry.
        max_abs_scale: reject specs with a larger |scale|.
        **engine_kwargs: passed to ``vllm.LLM`` (``dtype``, ``enforce_eager``, ``max_model_len``...).
            On CPU the KV cache defaults to 4 GiB (vLLM would reserve 92% of RAM).

    Example:
        >>> llm = vsteer.LLM("smollm2", enforce_eager=True)
        >>> llm.generate(["I think"], SamplingParams(max_tokens=20),
        ...              steering={"interventions": [{"op": "add", "vector": "love.safetensors",
        ...                                            "layers": [10], "scale": 4.0}]})
    """

    def __init__(
        self,
        model: str = "smollm2",
        *,
        max_slots: int | None = None,
        max_ablation_rank: int = 1,
        steerable_layers: Sequence[int] | None = None,
        capture_layers: Sequence[int] | None = None,
        store: str | os.PathLike | None = None,
        max_abs_scale: float = DEFAULT_MAX_ABS_SCALE,
        saes: Sequence[str] | None = None,
        max_sas_support: int = 1024,
        sae_store: str | os.PathLike | None = None,
        effect_saes: Sequence[str] = (),
        condition_layers: Sequence[int] = (),
        max_conditions: int = 2,
        **engine_kwargs: Any,
    ) -> None:
        import vllm
        from vllm.platforms import current_platform

        path = resolve_model(model)
        settings = SteeringSettings(
            max_slots=max_slots, max_ablation_rank=max_ablation_rank,
            steerable_layers=list(steerable_layers) if steerable_layers is not None else None,
            capture_layers=list(capture_layers) if capture_layers is not None else None,
            vector_store=None if store is None else os.fspath(store), saes=list(saes or ()),
            sae_store=None if sae_store is None else os.fspath(sae_store), max_sas_support=max_sas_support,
            effect_saes=list(effect_saes), condition_layers=[int(x) for x in condition_layers], max_conditions=max_conditions)
        self.config, self.model_shape, self.sae_store, self.saes = engine_setup(settings, path, edge=False)
        self.store = open_store(Path(self.config.store))
        self.max_abs_scale = max_abs_scale
        refuse_unsupported_kwargs(engine_kwargs, effects=bool(effect_saes))
        device = current_platform.device_type
        if "dtype" not in engine_kwargs and (dtype := chosen_dtype(device)) is not None:
            engine_kwargs["dtype"] = dtype
        if device not in _WORKERS:
            raise EngineError(f"vsteer supports CPU and CUDA devices, not {device!r}")
        if device == "cpu" and not ({"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(engine_kwargs)) \
                and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # vLLM-CPU otherwise reserves 92% of RAM and refuses to start when others use memory.
            engine_kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_BYTES
        additional = dict(engine_kwargs.pop("additional_config", None) or {})
        additional[ADDITIONAL_CONFIG_KEY] = self.config.model_dump()
        self.engine = vllm.LLM(
            model=path,
            worker_cls=_WORKERS[device],
            scheduler_cls=_SCHEDULER,
            additional_config=additional,
            **engine_kwargs,
        )
        self.model_path = path
        #: steering slots the engine has (``max_slots``, or the default resolved from vLLM's config)
        self.max_slots = self.config.resolved_max_slots(self.engine.llm_engine.vllm_config)

    @classmethod
    def from_vllm(cls, engine: Any, *, max_abs_scale: float = DEFAULT_MAX_ABS_SCALE,
                  sae_store: str | os.PathLike | None = None) -> "LLM":
        """Steer a stock ``vllm.LLM`` that vsteer's vLLM plugin made a steering engine (started with
        ``additional_config={"vsteer": {...}}``; :class:`vsteer.engine.plugin.SteeringSettings`).
        The result has this class's whole API over that engine.

        Raises:
            EngineError: ``engine`` is not a steering engine, or takes only an HTTP edge's sealed steering.
        """
        from vsteer.sae import SaeStore, default_sae_store, load_sae

        vllm_config = engine.llm_engine.vllm_config
        if vllm_config.parallel_config.worker_cls not in _WORKERS.values():
            raise EngineError("this vllm.LLM does not steer: start it with additional_config={'vsteer': {...}} "
                              "and vsteer installed (its vLLM plugin builds the steering engine)")
        config = SteeringEngineConfig.from_vllm(vllm_config.additional_config)
        if config.edge:
            raise EngineError("this engine takes only steering sealed by vsteer's HTTP edge")
        self = cls.__new__(cls)
        self.model_path = vllm_config.model_config.model
        info = model_info(self.model_path)
        self.model_shape = ModelShape(info.name, info.num_layers, info.hidden_size)
        self.config, self.engine, self.max_abs_scale = config, engine, max_abs_scale
        self.store = open_store(Path(config.store))
        self.sae_store = SaeStore(Path(sae_store) if sae_store else default_sae_store())
        self.saes = {name: load_sae(path) for name, path in config.saes.items()}
        self.max_slots = config.resolved_max_slots(vllm_config)
        return self

    def steering_args(self, steering: object) -> dict[str, Any]:
        """``SamplingParams.extra_args`` that steer one request as ``steering`` says, for callers that
        submit to the vLLM engine themselves (empty for ``None``).

        Raises:
            SpecError: the spec is invalid, or it has a ``sara`` op (computed from each request's
                own prompt: :meth:`generate` runs it).
        """
        plan = self.resolve(steering)
        if plan is None:
            return {}
        if any(it.op == "sara" for it in plan.interventions):
            raise SpecError("sara is computed from each request's own prompt; steer it with generate()", field="steering")
        return {EXTRA_ARGS_KEY: plan.to_extra_args()}

    # --- vectors --------------------------------------------------------------------------------
    def register_vector(self, name: str, vector: SteeringVector | str | os.PathLike) -> str:
        """Store a vector and name it in the store (``vsteer vectors list`` shows it); specs can
        then say ``"vector": name``. Re-registering a name points it at the new vector.
        Returns the sha256."""
        if not isinstance(vector, SteeringVector):
            vector = load_vector(Path(vector))
        sha = self.store.put(vector)
        self.store.set_name(name, sha, overwrite=True)
        return sha

    def resolve(self, steering: object) -> SteeringPlan | None:
        """Validate one steering spec against this engine (raises SpecError naming the field).
        A plan this engine resolved already is returned as it is."""
        if isinstance(steering, SteeringPlan):
            return steering
        return resolve_spec(
            steering,
            store=self.store,
            model=self.model_shape,
            steerable_layers=self.config.steerable_layers,
            max_ablation_rank=self.config.max_ablation_rank,
            max_slots=self.max_slots,
            max_abs_scale=self.max_abs_scale,
            saes=self.saes,
            sae_store=self.sae_store,
            max_sas_support=self.config.max_sas_support,
            condition_layers=self.config.condition_layers,
            max_conditions=self.config.max_conditions,
        )

    # --- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: Any = None,
        steering: object | Sequence[object] = None,
        *,
        lora_request: Any = None,
        use_tqdm: bool = False,
    ) -> list[Any]:
        """Generate with per-prompt steering.

        Args:
            prompts: text prompts, or token-id lists.
            sampling_params: one ``vllm.SamplingParams`` or one per prompt.
            steering: None (unsteered), one spec for every prompt, or a list with one spec
                (or None) per prompt. Every spec is validated before anything reaches the engine.
            lora_request: a ``vllm.lora.request.LoRARequest`` (or one per prompt, None for none),
                as for ``vllm.LLM.generate``; the engine needs ``enable_lora=True``. Steering and
                the adapter compose: the adapter changes the layers' weights, steering their outputs.

        Returns:
            vLLM ``RequestOutput`` objects, in prompt order. A request the engine failed (its
            forward pass went non-finite) has finish reason ``"error"`` and the reason in
            ``stop_reason`` (``vsteer.engine.failures.parse_failure`` reads it).

        Raises:
            SpecError: a spec is invalid; nothing was submitted.
        """
        from vllm import SamplingParams

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        specs, per_prompt = self._per_prompt(steering, len(prompts))
        plans = []
        for i, spec in enumerate(specs):
            try:
                plans.append(self.resolve(spec))
            except SpecError as exc:
                if not per_prompt:
                    raise
                raise SpecError(exc.reason, field=f"steering.{i}.{exc.field or ''}".rstrip(".")) from exc
        plans = self._materialize_sara(prompts, plans)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        inputs, per_params = [], []
        for prompt, plan, sp in zip(prompts, plans, params):
            item = _prompt_input(prompt)
            sp = sp.clone()
            if plan is not None:  # the engine derives the prefix-cache salt from the plan
                sp.extra_args = {**(sp.extra_args or {}), EXTRA_ARGS_KEY: plan.to_extra_args()}
            inputs.append(item)
            per_params.append(sp)
        return self.engine.generate(inputs, per_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def _materialize_sara(self, prompts: list, plans: list[SteeringPlan | None]) -> list[SteeringPlan | None]:
        """Turn each ``sara`` intervention into a per-neuron ``mul`` by 1 + c*r, with r computed
        from that request's own prompt (one capture pass for all of them)."""
        needs = [(i, j) for i, plan in enumerate(plans) if plan for j, it in enumerate(plan.interventions) if it.op == "sara"]
        if not needs:
            return plans
        from vsteer.methods.sara import SaraSet, sara_factor, sara_r

        layers = sorted({plans[i].interventions[j].layers[0] for i, j in needs})
        for layer in layers:
            if layer not in self.capture_layers:
                raise SpecError(f"sara at layer {layer} needs a capture buffer there (capture layers: {self.capture_layers})", field="layers")
        sets: dict[tuple[str, int], SaraSet] = {}
        for i, j in needs:
            item = plans[i].interventions[j]
            key = (item.vector, item.layers[0])
            if key not in sets:
                sets[key] = self._sara_set(json.loads(item.vector), item.layers[0])
        rows = sorted({i for i, _ in needs})
        caps = dict(zip(rows, self.capture([prompts[i] for i in rows], layers)))
        out = list(plans)
        for i, j in needs:
            item = out[i].interventions[j]
            layer = item.layers[0]
            r = sara_r(caps[i][layer].double().T, sets[(item.vector, layer)])
            factor = SteeringVector.from_tensors(
                {layer: sara_factor(r, item.scale).float()},
                model=self.model_shape.name,
                method="sara-factor",
                provenance={"source": json.loads(item.vector), "c": item.scale, "layer": layer},
            )
            mul = dataclasses.replace(item, op="mul", vector=self.store.put(factor), scale=1.0)
            items = list(out[i].interventions)
            items[j] = mul
            out[i] = SteeringPlan(tuple(items))
        return out

    def _sara_set(self, source: dict, layer: int):
        from vsteer.methods.sara import SaraSet

        if "path" in source:
            sara_set = SaraSet.load(source["path"])
        else:
            att, rep = self.capture([source["attract"], source["repel"]], [layer])
            sara_set = SaraSet.from_activations(att[layer].double().T, rep[layer].double().T)
        if sara_set.hidden_size != self.model_shape.hidden_size:
            raise SpecError(
                f"SARA set has hidden size {sara_set.hidden_size} but {self.model_shape.name} has "
                f"{self.model_shape.hidden_size}",
                field="vector",
            )
        return sara_set

    def capture(
        self, prompts: str | Sequence[str] | Sequence[Sequence[int]], layers: Sequence[int]
    ) -> list[dict[int, torch.Tensor]]:
        """Read the residual stream at the output of ``layers`` for every prompt token.

        The activations are read inside the engine during the prompt's forward pass (before any
        steering at that layer), i.e. HF ``hidden_states[L + 1]`` of the unsteered model.

        Returns:
            One dict per prompt: layer -> float32 tensor ``[num_prompt_tokens, hidden]``.
        """
        from vllm import SamplingParams

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        layers = [int(x) for x in layers]
        allowed = self.capture_layers
        for layer in layers:
            if not 0 <= layer < self.model_shape.num_layers:
                raise SpecError(
                    f"layer {layer} is out of range: {self.model_shape.name} has layers "
                    f"0..{self.model_shape.num_layers - 1}",
                    field="layers",
                )
            if layer not in allowed:
                raise SpecError(
                    f"layer {layer} has no capture buffer (capture layers: {allowed})", field="layers"
                )
        with tempfile.TemporaryDirectory(prefix="vsteer-capture-") as tmp:
            inputs, params, paths = [], [], []
            for i, prompt in enumerate(prompts):
                path = str(Path(tmp) / f"{i}.safetensors")
                inputs.append(_prompt_input(prompt))  # capture requests never read the prefix cache
                params.append(SamplingParams(max_tokens=1, extra_args={CAPTURE_ARGS_KEY: {"layers": layers, "path": path}}))
                paths.append(path)
            self.engine.generate(inputs, params, use_tqdm=False)
            out = []
            for path in paths:
                if not os.path.exists(path):
                    raise EngineError(f"the engine wrote no capture for {path}")
                tensors = load_file(path)
                out.append({layer: tensors[f"layer.{layer}"] for layer in layers})
        return out

    @property
    def capture_layers(self) -> list[int]:
        steerable = self.config.steerable_layers or list(range(self.model_shape.num_layers))
        chosen = self.config.capture_layers
        return sorted(steerable if chosen is None else set(chosen) & set(steerable))

    def stats(self) -> dict:
        """Steering slot statistics from the (first) worker."""
        return self.engine.collective_rpc("vsteer_stats")[0]

    def take_effects(self, keys: Sequence[str]) -> dict[str, dict]:
        """Per-request SAE-code sums of finished effect requests, by their key (see
        ``vsteer.effects``): ``{key: {"sums": {layer: float32 [d_sae]}, "count": int, "partial": bool}}``."""
        return self.engine.collective_rpc("vsteer_take_effects", args=(list(keys),))[0]

    def get_tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    @property
    def max_model_len(self) -> int:
        return self.engine.llm_engine.model_config.max_model_len

    def _per_prompt(self, steering: object, n: int) -> tuple[list[object], bool]:
        if isinstance(steering, (list, tuple)) and not _is_intervention_list(steering):
            if len(steering) != n:
                raise SpecError(f"got {len(steering)} steering specs for {n} prompts", field="steering")
            return list(steering), True
        return [steering] * n, False


def _is_intervention_list(value: Sequence[object]) -> bool:
    """A bare list of interventions (one spec) rather than one spec per prompt."""
    return len(value) > 0 and all(isinstance(v, Mapping) and "op" in v for v in value)


def _prompt_input(prompt: str | Sequence[int]) -> dict:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"prompt_token_ids": [int(t) for t in prompt]}
