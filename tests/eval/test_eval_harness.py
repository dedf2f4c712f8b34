"""The steering-quality harness end to end on the default model: local scorer, methods, resume,
monotone scores, and the judge client's errors (its run against a real `vsteer serve`:
tests/server/shared_server/test_judge.py)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from vsteer.eval import (
    JudgeParseError,
    JudgeResponseError,
    JudgeScorer,
    JudgeUnreachableError,
    LocalScorer,
    MethodUnavailableError,
    ScoreItem,
    available_methods,
    get_method,
    load_concepts,
    load_records,
    parse_score,
    run_eval,
)
from vsteer.server.process import free_port

@pytest.fixture(scope="module")
def scorer(eager_llm):
    return LocalScorer(eager_llm)


# --- data, registry, parsing (no engine) ---------------------------------------------------------
def test_concepts_file_has_the_protocol_concepts():
    names = [c.name for c in load_concepts()]
    assert {"wedding", "london", "love", "anger", "french"} <= set(names) and len(names) >= 8
    for c in load_concepts():
        assert c.description and c.words and len(c.positive) >= 4 and len(c.negative) >= 4
    assert load_concepts(["London"])[0].name == "london"
    with pytest.raises(KeyError, match="known concepts: wedding"):
        load_concepts(["no-such-concept"])


def test_unknown_method_is_a_clear_error():
    assert {"caa", "actadd", "sara", "sae", "sae-ts", "sas"} <= set(available_methods())
    with pytest.raises(MethodUnavailableError, match="available methods: actadd, caa, sae, sae-ts, sara, sas"):
        get_method("nope")


@pytest.mark.parametrize("reply, want", [
    ("Score: 7", 7.0), ("Rating: [[3]]", 3.0), ("I would give it 8/10.", 8.0), ("10", 10.0),
    ("**Score:** 6", 6.0), ("2 out of 10", 2.0), ("Score: 12 ... so 9", 9.0), ("no number here", None),
    ("Score: 0", None), ("", None),
])
def test_parse_score(reply, want):
    assert parse_score(reply) == want


# --- local scorer and harness on the real model ------------------------------------------------------
def test_method_specs_are_valid_for_the_engine(eager_llm):
    london = load_concepts(["london"])[0]
    for name in ("caa", "actadd", "sara"):
        m = get_method(name)
        prepared = m.prepare(eager_llm, london)
        assert m.spec(prepared, 0.0) is None  # scale 0 is the unsteered model
        eager_llm.resolve(m.spec(prepared, max(m.default_scales)))  # raises SpecError if bad


def test_sae_and_sas_methods_build_specs_the_engine_runs(eager_llm):
    from vllm import SamplingParams

    wedding = load_concepts(["wedding"])[0]
    sae_m, sas_m = get_method("sae", sae="test-relu"), get_method("sas", sae="test-jumprelu", tau=0.5)
    feature = sae_m.prepare(eager_llm, wedding)
    assert 0 <= feature < 512 and sae_m.spec(feature, 0.0) is None
    sha = sas_m.prepare(eager_llm, wedding)
    assert eager_llm.store.get(sha).method == "sas"
    specs = [sae_m.spec(feature, 16.0), sas_m.spec(sha, 4.0), None]
    outs = eager_llm.generate(["I think"] * 3, SamplingParams(max_tokens=8, temperature=0.0), steering=specs)
    assert outs[0].outputs[0].token_ids != outs[2].outputs[0].token_ids
    with pytest.raises(Exception, match="needs the engine to load SAE"):
        get_method("sas", sae="test-not-loaded").prepare(eager_llm, wedding)


def test_local_scorer_separates_on_topic_from_off_topic_and_fluent_from_broken(scorer):
    london, wedding = load_concepts(["london", "wedding"])
    on = "I think London is the best city in England: the Thames, Big Ben and the red buses."
    off = "I think the printer on my desk needs a new cartridge before Monday."
    broken = "I think think think think think think think think think think think think think think."
    salad = "I think buses cartridge the Monday red desk Thames printer before needs city on."
    items = [ScoreItem("I think", t[len("I think"):], c) for t in (on, off, broken, salad) for c in (london, wedding)]
    s = {(t, c.name): r for t, c, r in zip([it.text for it in items], [it.concept for it in items], scorer.score(items))}
    assert s[(on, "london")].behaviour > 0.8
    assert s[(off, "london")].behaviour < 0.2 and s[(on, "wedding")].behaviour < 0.2
    # coherence is relative to the model's own unsteered samples of "I think" (1) and their shuffled words (0);
    # human-written text is less predictable to a 135M model than its own samples, hence ~0.5 here
    assert s[(on, "london")].coherence > 0.3 and s[(off, "london")].coherence > 0.3
    assert s[(broken, "london")].coherence < 0.25 and s[(salad, "london")].coherence < 0.1
    assert s[(on, "london")].coherence == s[(on, "wedding")].coherence  # one measurement per text
    assert scorer.describe()["name"] == "local" and scorer.describe()["version"] == "local-v1"


def test_run_eval_end_to_end_with_the_local_scorer_and_resume(eager_llm, scorer, tmp_path):
    scales = {"caa": [0, 64], "actadd": [0, 4], "sara": [0, 1]}
    kw = {"n": 3, "max_tokens": 10, "seed": 1, "scorer": scorer, "out_dir": tmp_path, "progress": False}
    summary = run_eval(eager_llm, ["london", "love"], ["caa", "actadd", "sara"], scales, **kw)

    records = load_records(tmp_path)
    assert len(records) == 2 * 3 * 2
    for r in records:
        assert r["scorer"]["name"] == "local" and r["scorer"]["version"] == "local-v1"
        assert len(r["samples"]) == 3 and r["n_scored"] == 3
        assert 0.0 <= r["behaviour"] <= 1.0 and 0.0 <= r["coherence"] <= 1.0
        assert r["product"] == pytest.approx(r["behaviour"] * r["coherence"])
        assert (r["spec"] is None) == (r["scale"] == 0)
    # the unsteered cells of every method share their samples (same seeds, one generation)
    plain = {json.dumps([s["completion"] for s in r["samples"]]) for r in records if r["scale"] == 0}
    assert len(plain) == 1
    assert len(summary["best"]) == 6
    for b in summary["best"]:
        cells = [r for r in records if r["concept"] == b["concept"] and r["method"] == b["method"]]
        assert b["product"] == pytest.approx(max(r["product"] for r in cells))
    md = (tmp_path / "results.md").read_text()
    assert "local scorer local-v1" in md and "| london |" in md and "caa | actadd | sara" in md
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["scorer"]["name"] == "local"
    ref = saved["scorer_reference"]  # coherence anchors from this run's unsteered samples
    assert ref["prompt"] == "I think" and ref["nll_bad"] > ref["nll_ok"] + 1
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "quality.png").stat().st_size > 0 and (tmp_path / "best.png").exists()
    except ImportError:
        assert summary["plots"] == []

    # rerun: every cell is done, nothing is generated or scored again (vLLM's own request counter)
    requests = eager_llm.engine.request_counter.counter
    again = run_eval(eager_llm, ["london", "love"], ["caa", "actadd", "sara"], scales, **kw)
    assert eager_llm.engine.request_counter.counter == requests and len(load_records(tmp_path)) == 12
    assert again["best"] == summary["best"]

    # `vsteer eval intervals` on the finished run: its point values are the protocol's best products
    from tests.test_cli import run

    res = json.loads(run("eval", "intervals", str(tmp_path), "--baseline", "caa", "--reps", "200", "--json").stdout)
    assert set(res["max"]["minus_baseline"]) == {"actadd", "sara"}
    best = {(b["concept"], b["method"]): b["product"] for b in summary["best"]}
    for cell in res["max"]["cells"]:
        assert cell["value"] == pytest.approx(best[(cell["concept"], cell["method"])])
        assert 0 <= cell["interval"][0] <= cell["interval"][1] <= 1
    bad = run("eval", "intervals", str(tmp_path), "--baseline", "nope", check=False)
    assert bad.returncode != 0 and "--baseline" in bad.stderr


def test_scores_are_monotone_in_the_obvious_cases(eager_llm, scorer, tmp_path):
    """Unsteered text scores near zero for an unrelated concept; a strong CAA vector raises it."""
    summary = run_eval(eager_llm, ["london"], ["caa"], [0, 80], n=8, max_tokens=24, scorer=scorer,
                       out_dir=tmp_path, progress=False, plots=False)
    by_scale = {r["scale"]: r for r in summary["cells"]}
    assert by_scale[0.0]["behaviour"] < 0.2, by_scale
    assert by_scale[80.0]["behaviour"] > by_scale[0.0]["behaviour"] + 0.3, by_scale
    assert summary["best"][0]["scale"] == 80.0


# --- the judge client (against a real server: tests/server/shared_server/test_judge.py) ------------------
def test_judge_scorer_errors_are_clear():
    with pytest.raises(JudgeUnreachableError, match="unreachable"):
        JudgeScorer(f"http://127.0.0.1:{free_port()}/v1", "m", retries=1, backoff=0.01, timeout=2).check()

    replies = {"body": b"<html>not json</html>"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(replies["body"])

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        with pytest.raises(JudgeResponseError, match="not a chat completion"):
            JudgeScorer(url, "m", retries=1, backoff=0.01).check()
        replies["body"] = json.dumps({"choices": [{"message": {"content": "I cannot rate this."}}]}).encode()
        item = ScoreItem("I think", " hello", load_concepts(["love"])[0])
        [score] = JudgeScorer(url, "m", retries=1, backoff=0.01).score([item])
        assert score.behaviour is None and "no score 1..10" in score.details["errors"][0]
        with pytest.raises(JudgeParseError, match="I cannot rate this"):
            JudgeScorer(url, "m", retries=0, strict=True).score([item])
    finally:
        srv.shutdown()
