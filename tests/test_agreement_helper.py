"""tests/_reference/agreement.py on fabricated greedy outputs (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests._reference.agreement import LOGPROB_TOL, TIE_GAP, assert_greedy_agrees


def _output(steps: list[dict[int, float]]):
    """A RequestOutput-like greedy output: each step {token: logprob}, the chosen token first."""
    return SimpleNamespace(outputs=[SimpleNamespace(
        token_ids=[next(iter(s)) for s in steps],
        logprobs=[{t: SimpleNamespace(logprob=lp) for t, lp in s.items()} for s in steps])])


WANT = [{5: -0.1, 6: -2.5}, {7: -0.700, 8: -0.701}, {9: -0.2, 1: -3.0}]  # step 1: a near-tie (gap 1e-3)


def test_identical_outputs_agree():
    seen = assert_greedy_agrees(_output(WANT), _output(WANT))
    assert (seen.compared, seen.max_logprob_diff, seen.diverged_at) == (3, 0.0, None)


def test_rounding_sized_logprob_differences_agree():
    got = [{5: -0.1003, 6: -2.5002}, {7: -0.7001, 8: -0.7009}, {9: -0.2004, 1: -3.0}]
    seen = assert_greedy_agrees(_output(got), _output(WANT))
    assert seen.diverged_at is None and seen.max_logprob_diff == pytest.approx(4e-4)


def test_a_near_tie_divergence_is_allowed_and_ends_the_comparison():
    got = [{5: -0.1001, 6: -2.5}, {8: -0.7005, 7: -0.7008}, {2: -0.1, 3: -5.0}]  # flipped, then its own way
    seen = assert_greedy_agrees(_output(got), _output(WANT))
    assert (seen.compared, seen.diverged_at) == (1, 1)
    assert seen.gap == pytest.approx(1e-3) and seen.gap < TIE_GAP


def test_a_clear_divergence_fails_naming_the_step_tokens_and_gap():
    got = [{5: -0.1, 6: -2.5}, {7: -0.7, 8: -0.701}, {1: -0.5, 9: -0.6}]  # reference gap 2.8 nats
    with pytest.raises(AssertionError, match=r"x: step 2: got token 1, reference token 9; reference top-2 gap 2\.8000"):
        assert_greedy_agrees(_output(got), _output(WANT), label="x")


def test_a_flip_to_the_runner_up_beyond_the_tie_gap_fails():
    want = [{5: -0.1, 6: -0.1 - 2 * TIE_GAP}]
    got = [{6: -0.1 - 2 * TIE_GAP, 5: -0.1}]  # logprobs agree, yet the reference was not near a tie
    with pytest.raises(AssertionError, match="step 0: got token 6, reference token 5.*not a near-tie"):
        assert_greedy_agrees(_output(got), _output(want))


def test_a_divergence_to_a_token_outside_the_reference_top2_fails():
    got = [{5: -0.1, 6: -2.5}, {4: -0.6, 7: -0.7}, {9: -0.2}]
    with pytest.raises(AssertionError, match="step 1: got token 4, reference token 7"):
        assert_greedy_agrees(_output(got), _output(WANT))


def test_a_logprob_difference_beyond_tolerance_fails_even_with_equal_tokens():
    got = [{5: -0.1, 6: -2.5}, {7: -0.7 - 3 * LOGPROB_TOL, 8: -0.701}, {9: -0.2, 1: -3.0}]
    with pytest.raises(AssertionError, match=r"step 1, token 7: .*> 2e-03"):
        assert_greedy_agrees(_output(got), _output(WANT))


def test_outputs_without_top2_logprobs_are_refused():
    bare = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 7, 9], logprobs=None)])
    with pytest.raises(AssertionError, match="logprobs=2"):
        assert_greedy_agrees(bare, _output(WANT))
