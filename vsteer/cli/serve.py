"""``vsteer serve``: vLLM's OpenAI-compatible server with per-request steering (a thin adapter over
:mod:`vsteer.server.serve`)."""

from __future__ import annotations

from pathlib import Path

import click

from vsteer.cli._common import layers_option


__all__ = ["serve"]


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": ["--vsteer-help"]})
@click.option("--max-slots", type=int, default=None, help="Steering slots (default: --max-num-seqs, or vLLM's resolved max_num_seqs capped by a 1 GiB bank budget).")
@click.option("--max-ablation-rank", default=1, show_default=True, help="Ablations per layer one request may compose.")
@click.option("--vector-store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Vector store folder (default: $VSTEER_VECTOR_STORE or ~/.cache/vsteer/vectors).")
@click.option("--max-abs-scale", default=1.0e4, show_default=True, help="Refuse specs with a larger |scale|.")
@click.option("--tenants", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help='JSON {"tenants": {name: {"keys": [...], "max_vectors": N, "max_configs_in_flight": N}}} '
                   "(or $VSTEER_TENANTS: the file's path or its JSON text). Without it the server is single-tenant.")
@click.option("--sae", "saes", multiple=True, help="An SAE for sas ops (name in the SAE store or path); repeatable.")
@click.option("--max-sas-support", default=1024, show_default=True, help="Features one SAE layer may touch per step.")
@click.option("--sae-store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="SAE store folder (default: $VSTEER_SAE_STORE or ~/.cache/vsteer/saes).")
@click.option("--capture-layers", default="none", show_default=True,
              help='Layers with an activation-capture buffer: "none", "all" or a comma list like 10,12. '
                   "The server never captures by itself; each buffer costs max_num_batched_tokens x hidden x dtype bytes.")
@click.option("--default-steering", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help='JSON steering spec for requests without a "steering" key; a request\'s own spec replaces it '
                   'and "steering": null turns it off.')
@click.option("--condition-layers", default="none", show_default=True,
              help='Layers where conditional steering ("when") may read the prompt: "none" or a comma list like 6,8.')
@click.option("--max-conditions", default=2, show_default=True, help="Conditions (and distinct gates) one request may carry.")
@click.option("--print-command", is_flag=True, help="Print the stock vLLM command this runs, and exit.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(max_slots: int | None, max_ablation_rank: int, vector_store: Path | None, max_abs_scale: float,
          tenants: Path | None, saes: tuple[str, ...], max_sas_support: int, sae_store: Path | None,
          capture_layers: str, default_steering: Path | None, condition_layers: str, max_conditions: int,
          print_command: bool, vllm_args: tuple[str, ...]) -> None:
    """vLLM's OpenAI-compatible server with per-request steering: vsteer serve [MODEL] [vllm serve options].

    MODEL defaults to the embedded SmolLM2. Requests carry "steering": {...} in the body (extra_body
    of the OpenAI client) or "vllm_xargs": {"steering": "<JSON>"}. Options other than vsteer's go to
    vLLM; MODEL may stand among them, as in `vllm serve`.
    Quiet by default: vLLM's logs go to the log file; uvicorn's start-up lines (where it listens)
    and access lines of error responses (status >= 400) still print.
    """
    from vsteer.server.serve import serve_main

    serve_main(vllm_args, max_slots=max_slots, max_ablation_rank=max_ablation_rank, vector_store=vector_store,
               max_abs_scale=max_abs_scale, saes=saes, max_sas_support=max_sas_support, sae_store=sae_store,
               capture_layers=_capture_layers(capture_layers), default_steering=_read_spec(default_steering),
               condition_layers=layers_option(condition_layers, "--condition-layers", allow_all=False) or [],
               max_conditions=max_conditions, tenants=tenants, print_command=print_command)


def _read_spec(path: Path | None) -> object:
    """The JSON in ``--default-steering`` (None without the option)."""
    import json

    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise click.BadParameter(f"{path}: not a JSON steering spec ({exc})", param_hint="--default-steering") from None


def _capture_layers(text: str) -> list[int] | None:
    """``--capture-layers``: "none" -> [], "all" -> None (every steerable layer), "10,12" -> [10, 12]."""
    return layers_option(text, "--capture-layers", allow_all=True)
