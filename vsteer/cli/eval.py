"""``vsteer eval``: the steering-quality evaluation (SAE-TS protocol) from the command line.

    vsteer eval run --concepts wedding,london,love --methods caa,actadd,sara --n 16 --out eval-out
    vsteer eval run ... --scales 0,32,64 --scales sara=0,1,2      # one sweep for all, or per method
    vsteer eval run ... --methods sae,sae-ts,sas --approximator approx.safetensors
    vsteer eval run ... --scorer judge --judge-url http://127.0.0.1:8000/v1 --judge-model big
    vsteer eval concepts | vsteer eval methods
"""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["eval_group"]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_scales(values: tuple[str, ...]) -> list[float] | dict[str, list[float]] | None:
    """``--scales 0,4,8`` (every method) and/or ``--scales caa=0,32,64`` (one method).

    A plain list and per-method lists may be mixed: the plain list is the default for methods
    not named (key "*"). Returns None when no option was given (each method's own default sweep)."""
    if not values:
        return None
    common: list[float] | None = None
    per: dict[str, list[float]] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        try:
            if sep:
                per[name.strip().lower()] = [float(x) for x in _csv(rest)]
            else:
                common = [float(x) for x in _csv(value)]
        except ValueError as exc:
            raise click.BadParameter(f"{value!r}: scales are comma-separated numbers ({exc})",
                                     param_hint="--scales") from None
    if common is not None:
        per["*"] = common
    return per if len(per) > 1 or "*" not in per else common


@click.group("eval")
def eval_group() -> None:
    """Steering-quality evaluation: behaviour x coherence, max over a scale sweep."""


@eval_group.command("concepts")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Concepts JSON (default: the one shipped with vsteer).")
def concepts_cmd(path: str | None) -> None:
    """List the concepts and their descriptions."""
    from vsteer.eval.concepts import load_concepts

    for c in load_concepts(path=path):
        click.echo(f"{c.name:10s} {c.description}")


@eval_group.command("methods")
def methods_cmd() -> None:
    """List the available steering methods."""
    from vsteer.eval.methods import available_methods, method_summary

    for name in available_methods():
        description, scales = method_summary(name)
        click.echo(f"{name:8s} {description} (default scales {', '.join(f'{s:g}' for s in scales)})")


#: Methods that take the SAE option.
SAE_METHODS = ("sae", "sae-ts", "sas")


def build_methods(names: list[str], *, sae: str, approximator: str | None = None) -> list:
    """The named methods, with the SAE (and SAE-TS approximator) options where they apply."""
    from vsteer.eval.methods import get_method

    def options(name: str) -> dict:
        key = name.strip().lower()
        if key == "sae-ts":
            return {"sae": sae, "approximator": approximator}
        return {"sae": sae} if key in SAE_METHODS else {}

    return [get_method(m, **options(m)) for m in names]


@eval_group.command("run")
@click.option("--concepts", default="wedding,london,love,anger,french", show_default=True,
              help="Comma-separated concept names (`vsteer eval concepts`).")
@click.option("--concepts-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Concepts JSON (default: the one shipped with vsteer).")
@click.option("--methods", default="caa,actadd,sara", show_default=True,
              help="Comma-separated methods (`vsteer eval methods`).")
@click.option("--scales", multiple=True,
              help="Scale sweep: '0,4,8' for every method or 'caa=0,32,64' for one (repeatable). "
                   "Default: each method's own sweep. 0 = unsteered.")
@click.option("--n", default=16, show_default=True, help="Completions per (concept, method, scale).")
@click.option("--max-tokens", default=30, show_default=True)
@click.option("--prompt", default="I think", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--top-p", default=0.3, show_default=True)
@click.option("--top-k", default=50, show_default=True)
@click.option("--scorer", "scorer_name", type=click.Choice(["local", "judge"]), default="local", show_default=True,
              help="local: the unsteered model's log-probabilities (no network); judge: an OpenAI-compatible endpoint.")
@click.option("--judge-url", default=None, help="Judge API root, e.g. http://127.0.0.1:8000/v1.")
@click.option("--judge-model", default=None, help="Model name the judge endpoint serves.")
@click.option("--judge-api-key", envvar="VSTEER_JUDGE_API_KEY", show_envvar=True, default=None)
@click.option("--judge-concurrency", default=4, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (results.jsonl, summary.json, results.md, plots); rerun to resume.")
@click.option("--model", default="smollm2", show_default=True, help="Model to steer (alias or local HF folder).")
@click.option("--eager/--compile", default=True, show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--max-num-seqs", default=128, show_default=True)
@click.option("--max-model-len", default=1024, show_default=True)
@click.option("--no-plots", is_flag=True, help="Skip the matplotlib plots.")
@click.option("--sae", default="smollm2-l15-4k", show_default=True,
              help="SAE of the sae, sae-ts and sas methods (name in the SAE store, `vsteer sae list`).")
@click.option("--approximator", type=click.Path(exists=True, dir_okay=False), default=None,
              help="sae-ts: effect approximator file (`vsteer effects fit`) measured with --sae.")
def run_cmd(concepts: str, concepts_file: str | None, methods: str, scales: tuple[str, ...], n: int, max_tokens: int,
            prompt: str, seed: int, temperature: float, top_p: float, top_k: int, scorer_name: str,
            judge_url: str | None, judge_model: str | None, judge_api_key: str | None, judge_concurrency: int,
            out_dir: Path, model: str, eager: bool, dtype: str, max_num_seqs: int, max_model_len: int,
            no_plots: bool, sae: str, approximator: str | None) -> None:
    """Generate, score and summarise a (concept x method x scale) sweep."""
    from vsteer.eval.concepts import load_concepts
    from vsteer.eval.harness import markdown_tables, run_eval
    try:
        concept_objs = load_concepts(_csv(concepts), path=concepts_file)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="--concepts") from None
    names = _csv(methods)
    method_objs = build_methods(names, sae=sae, approximator=approximator)  # fail before the engine starts
    sweep = parse_scales(scales)
    if scorer_name == "judge" and not (judge_url and judge_model):
        raise click.UsageError("--scorer judge needs --judge-url and --judge-model")
    scorer = None
    if scorer_name == "judge":
        from vsteer.eval.scorers import JudgeScorer

        scorer = JudgeScorer(judge_url, judge_model, judge_api_key, concurrency=judge_concurrency)
        scorer.check()
    from vsteer.engine.llm import LLM

    llm = LLM(model, enforce_eager=eager, dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
              enable_prefix_caching=True, saes=[sae] if "sas" in names else None)
    if scorer is None:
        from vsteer.eval.scorers import LocalScorer

        scorer = LocalScorer(llm, concepts_path=concepts_file)
    summary = run_eval(llm, concept_objs, method_objs, sweep, prompt=prompt, n=n, max_tokens=max_tokens, seed=seed,
                       scorer=scorer, out_dir=out_dir,
                       sampling={"temperature": temperature, "top_p": top_p, "top_k": top_k}, plots=not no_plots)
    click.echo("\n".join(markdown_tables(summary)))
    click.echo(f"\nwrote {out_dir / 'results.jsonl'}, summary.json, results.md"
               + (f", {', '.join(summary['plots'])}" if summary["plots"] else " (no plots)") + f" in {out_dir}",
               err=True)


@eval_group.command("intervals")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--baseline", default=None, help="Method the others are compared with (default: the first).")
@click.option("--methods", default=None, help="Comma-separated methods, in table order (default: all in the run).")
@click.option("--level", default=0.95, show_default=True, help="Interval coverage.")
@click.option("--reps", default=2000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of markdown.")
def intervals_cmd(run_dir: Path, baseline: str | None, methods: str | None, level: float, reps: int, seed: int,
                  as_json: bool) -> None:
    """Bootstrap intervals of a finished run's metric, and of each method's difference from a baseline."""
    import json

    from vsteer._errors import SpecError
    from vsteer.eval import load_records
    from vsteer.eval.intervals import interval_tables, quality_intervals

    records = load_records(run_dir)
    if not records:
        raise SpecError(f"no finished cells in {run_dir}", field="RUN_DIR")
    names = _csv(methods) if methods else None
    known = {r["method"] for r in records}
    for name in [*(names or []), *([baseline] if baseline else [])]:
        if name not in known:
            raise SpecError(f"method {name!r} is not in this run (it has {', '.join(sorted(known))})",
                            field="--baseline" if name == baseline else "--methods")
    if not 0 < level < 1:
        raise SpecError(f"must be in (0, 1), got {level}", field="--level")
    if reps < 1:
        raise SpecError(f"must be >= 1, got {reps}", field="--reps")
    try:
        result = quality_intervals(records, methods=names, baseline=baseline, reps=reps, level=level, seed=seed)
    except ValueError as exc:
        raise SpecError(str(exc), field="RUN_DIR") from exc
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(interval_tables(result)))
