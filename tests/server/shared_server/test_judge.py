"""The eval harness's judge client against a real steering server (this folder's shared server)."""

from __future__ import annotations

import pytest

from vsteer.eval import JudgeResponseError, JudgeScorer, ScoreItem, load_concepts, load_records, run_eval

MODEL = "smollm2"  # the shared server's --served-model-name (conftest.py)


def test_judge_scorer_against_a_real_vsteer_serve(server, eager_llm, tmp_path):
    judge = JudgeScorer(server + "/v1", MODEL, retries=1, concurrency=2, max_tokens=8)
    judge.check()  # one real chat completion
    london = load_concepts(["london"])[0]
    items = [ScoreItem("I think", " London is lovely in spring.", london),
             ScoreItem("I think", " the printer needs paper.", london)]
    scores = judge.score(items)
    assert judge.requests_sent >= 1 + 2 * len(items)
    for s in scores:
        assert s.details["behaviour_reply"] and s.details["coherence_reply"]  # the server answered
        for value, kind in ((s.behaviour, "behaviour"), (s.coherence, "coherence")):
            if value is None:  # the tiny judge may answer without a number: surfaced, not hidden
                assert any(f"no score 1..10 in the judge's {kind} reply" in e for e in s.details["errors"])
            else:
                assert 0.0 <= value <= 1.0

    # the harness records which judge produced the numbers
    summary = run_eval(eager_llm, ["london"], ["caa"], [0, 64], n=1, max_tokens=8, scorer=judge, out_dir=tmp_path,
                       progress=False, plots=False)
    record = load_records(tmp_path)[0]
    assert record["scorer"] == {**judge.describe()} and record["scorer"]["url"] == server + "/v1"
    assert record["scorer"]["model"] == MODEL
    assert f"judge {MODEL} at {server}/v1" in (tmp_path / "results.md").read_text()
    assert len(summary["cells"]) == 2

    with pytest.raises(JudgeResponseError, match="HTTP 404"):  # a model the endpoint does not serve
        JudgeScorer(server + "/v1", "no-such-model", retries=0).check()
