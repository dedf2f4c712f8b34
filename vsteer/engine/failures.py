"""How the engine fails one request, and tells the HTTP edge why.

vLLM ends a request it cannot serve with finish reason ``"error"``, which its server turns into a
bare 500. vsteer's scheduler labels three kinds of request ended that way: ones it refuses at
admission (a vector deleted after the edge passed them), ones whose forward pass went non-finite
(the runner checks every step's final hidden states and logits, :func:`nonfinite_rows`), and ones
whose structured output admits no token (:func:`grammar_dead_end`). It writes the
reason into the request's ``stop_reason`` (the one field an error output carries back to the
frontend) as ``vsteer-failure:<status>:<field>:<message>``; the edge (``vsteer serve``) raises it
as the HTTP error it names (:func:`parse_failure`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from vsteer.engine.token_map import StepRun

PREFIX = "vsteer-failure"
#: the status of a steered request whose hidden states or logits went non-finite: the request
#: itself (its steering) made numbers the model cannot carry
NONFINITE_STATUS = 422


class Failure(NamedTuple):
    """Why the engine ended a request with an error: HTTP status, the field at fault, a message."""

    status: int
    field: str | None
    message: str

    def reason(self) -> str:
        """The ``stop_reason`` text that carries this failure to the frontend."""
        return f"{PREFIX}:{self.status}:{self.field or ''}:{self.message}"


def parse_failure(stop_reason: object) -> Failure | None:
    """The failure a ``stop_reason`` carries, or None if it carries none."""
    if not isinstance(stop_reason, str) or not stop_reason.startswith(PREFIX + ":"):
        return None
    status, field, message = stop_reason[len(PREFIX) + 1 :].split(":", 2)
    return Failure(int(status), field or None, message)


def nonfinite(steered: bool) -> Failure:
    """The failure of a request whose hidden states or logits went non-finite."""
    if steered:
        return Failure(NONFINITE_STATUS, "steering", "the steered forward pass produced non-finite hidden states "
                       "or logits; lower the scale or the number of composed edits")
    return Failure(500, None, "the forward pass produced non-finite hidden states or logits")


def grammar_dead_end() -> Failure:
    """The failure of a request whose grammar or schema allows no next token (vLLM masks every
    token, samples one anyway and ends the request when the grammar rejects it): a schema that only
    refers to itself, a grammar rule that only expands to itself. The request's own input."""
    return Failure(400, "structured_outputs", "the request's structured output (response_format or "
                   "structured_outputs) allows no token at this point: its grammar or schema admits no text")


def row_is_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x``, whether it holds NaN or inf (one float32 sum per row: far cheaper than
    ``isfinite(x).all(-1)``; a finite row whose float32 sum overflowed would count as non-finite,
    which final-norm hidden states and logits never come near)."""
    return ~torch.isfinite(x.sum(-1, dtype=torch.float32))


def flagged_requests(hidden: torch.Tensor | None, token_runs: Sequence[StepRun],
                     logits: torch.Tensor | None, logit_rows: Sequence[str | None]) -> set[str]:
    """Requests of the step with a non-finite final hidden state (``token_runs``: where each
    request's tokens sit in the step) or a non-finite logits row (``logit_rows``: the request of
    each row). One small device-to-host copy."""
    num_tokens = token_runs[-1].off + token_runs[-1].n if token_runs else 0
    parts = []
    if hidden is not None and num_tokens:
        parts.append(row_is_nonfinite(hidden[:num_tokens]))
    else:
        num_tokens = 0
    if logits is not None:
        parts.append(row_is_nonfinite(logits))
    if not parts:
        return set()
    flags = torch.cat(parts).cpu().numpy()
    if not flags.any():
        return set()
    bad = {r.req_id for r in token_runs if num_tokens and flags[r.off : r.off + r.n].any()}
    rows = flags[num_tokens:]
    bad.update(logit_rows[i] for i in np.flatnonzero(rows) if i < len(logit_rows) and logit_rows[i] is not None)
    return bad


def blank_requests(bad: set[str], hidden: torch.Tensor | None, token_runs: Sequence[StepRun],
                   logits: torch.Tensor | None, logit_rows: Sequence[str | None]) -> None:
    """Zero, in place, the final hidden states and logits rows of the requests in ``bad`` before the
    step samples from them: a sampler fed NaN may fail for the whole batch (Triton's interpreter
    raises; a GPU kernel may return an id outside the vocabulary, which asynchronous scheduling
    feeds into the next step). Zero logits sample a valid token, and the request ends with an error
    anyway."""
    if hidden is not None:
        for r in token_runs:
            if r.req_id in bad:
                hidden[r.off : r.off + r.n] = 0
    if logits is not None:
        rows = [i for i, req_id in enumerate(logit_rows[: logits.shape[0]]) if req_id in bad]
        if rows:
            logits[rows] = 0
