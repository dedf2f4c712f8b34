"""Greedy agreement between two engines that are equal only up to float rounding.

Compiled (torch.compile/inductor) and eager float32 engines sum in different orders (other
vector widths, fused kernels), so their logits differ by rounding. Greedy decoding turns that
into a different token exactly when two candidates are (nearly) tied, and after that the two
continuations legitimately go separate ways. Comparing raw token lists therefore fails on some
CPUs (AVX2-only ones) and passes on others (AVX-512) without either engine being wrong.

`assert_greedy_agrees` compares two greedy outputs generated with ``logprobs=2`` (each step
lists the chosen token and the runner-up):

* tokens must be identical up to the first divergence;
* on that common prefix (and at the divergence step) every token listed at a step by both
  outputs (always the chosen one) must have logprobs within ``logprob_tol`` of each other;
* a divergence is allowed only as a near-tie: the token `got` chose must be the reference's
  runner-up, less than ``tie_gap`` below the reference's choice; anything else fails, naming the
  step, both tokens and the gap. After an allowed divergence nothing more is compared.

Tolerances, from measurement (float32 SmolLM2-135M, the two compiled tests in
tests/engine/test_batching.py and test_sas_engine.py, natively on AVX-512 and with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2):

* LOGPROB_TOL = 2e-3 nats, the tolerance the suite already allows between the float32 engine and
  a float64 reference (test_sas_engine.py). Compiled and eager differed by at most 3.3e-5 nats on
  either ISA (60x margin), while a steering error of 1% of the scale moves logprobs by ~8e-3 and a
  scale-0.1 add versus none by ~7e-3, so such errors still fail.
* TIE_GAP = 2 * LOGPROB_TOL = 4e-3 nats: if each candidate's logprob moves by at most LOGPROB_TOL,
  their gap moves by at most 2 * LOGPROB_TOL, so only a smaller gap can flip the argmax from
  rounding alone. The smallest top-2 gap in those tests' references is 1.1e-5 nats (test_batching
  config 1, "I think that", step 7: where the token-7 flip on AVX2-only CPUs fits); the next is
  7.9e-4. Neither emulated AVX2 nor AVX-512 flipped a token there.
"""

from __future__ import annotations

from dataclasses import dataclass

LOGPROB_TOL = 2e-3
TIE_GAP = 2 * LOGPROB_TOL


@dataclass(frozen=True)
class Agreement:
    """What `assert_greedy_agrees` saw: for reports and for the measurement of tolerances."""

    compared: int  # steps on the common prefix (all of them when there was no divergence)
    max_logprob_diff: float  # largest |logprob difference| of a token listed by both, over those steps
    diverged_at: int | None = None  # step of the allowed near-tie divergence, if any
    gap: float | None = None  # the reference's top-2 gap at that step


def _steps(output, label):
    completion = output.outputs[0]
    tokens, logprobs = list(completion.token_ids), completion.logprobs
    assert logprobs is not None and len(logprobs) == len(tokens), (
        f"{label}: generate greedily with SamplingParams(logprobs=2) so each step has its top 2")
    return tokens, logprobs


def _top2(step: dict, chosen: int) -> tuple[int | None, float]:
    """The runner-up behind `chosen` at one step and its gap (inf when none is listed)."""
    others = [(lp.logprob, tok) for tok, lp in step.items() if tok != chosen]
    if not others:
        return None, float("inf")
    lp, tok = max(others)
    return tok, step[chosen].logprob - lp


def assert_greedy_agrees(got_output, want_output, *, logprob_tol: float = LOGPROB_TOL,
                         tie_gap: float = TIE_GAP, label: str = "") -> Agreement:
    """Fail unless `got_output` equals the reference `want_output` up to float rounding (module
    docstring). Both are greedy vLLM RequestOutputs (or anything with .outputs[0].token_ids and
    .outputs[0].logprobs, a list of {token: obj with .logprob}) generated with logprobs >= 1."""
    got_tokens, got_lps = _steps(got_output, f"{label} (got)")
    want_tokens, want_lps = _steps(want_output, f"{label} (want)")
    worst = 0.0
    for step, (g, w) in enumerate(zip(got_tokens, want_tokens)):
        got_step, want_step = got_lps[step], want_lps[step]
        assert g in got_step and w in want_step, f"{label}: step {step}: the chosen token has no logprob"
        if g != w:
            runner_up, gap = _top2(want_step, w)
            if g in want_step:
                gap = want_step[w].logprob - want_step[g].logprob
            assert g == runner_up and gap < tie_gap, (
                f"{label}: step {step}: got token {g}, reference token {w}; reference top-2 gap "
                f"{gap:.4f} nats (runner-up {runner_up}) is not a near-tie (< {tie_gap:.0e}); "
                f"got {got_tokens}, want {want_tokens}")
        for tok in got_step.keys() & want_step.keys():  # the chosen token, the runner-up if both list it
            diff = abs(got_step[tok].logprob - want_step[tok].logprob)
            assert diff <= logprob_tol, (
                f"{label}: step {step}, token {tok}: logprob {got_step[tok].logprob:.6f} vs reference "
                f"{want_step[tok].logprob:.6f} (|diff| {diff:.2e} > {logprob_tol:.0e}); "
                f"got {got_tokens}, want {want_tokens}")
            if g == w:
                worst = max(worst, diff)
        if g != w:
            return Agreement(step, worst, step, gap)
    assert len(got_tokens) == len(want_tokens), f"{label}: {len(got_tokens)} tokens vs {len(want_tokens)}"
    return Agreement(len(got_tokens), worst)
