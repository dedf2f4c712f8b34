"""A request the engine ended on purpose comes back as the HTTP error the engine named.

vLLM's server answers every request that finished with reason ``"error"`` with a bare 500. vsteer's
scheduler labels the requests it fails itself (:mod:`vsteer.engine.failures`): a refusal at
admission (400 naming the field) or a forward pass that went non-finite (422 naming ``steering``
for a steered request). Wrapping the engine client's ``generate`` once turns those labels into the
exceptions vLLM's own error handlers map to that status, on every route that generates (and, in a
stream, into the error event vLLM sends there).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from vllm.exceptions import GenerationError, VLLMUnprocessableEntityError, VLLMValidationError

from vsteer.engine.failures import Failure, parse_failure


def failure_error(failure: Failure) -> Exception:
    """The vLLM exception whose handler answers with ``failure``'s status, field and message."""
    if failure.status == 400:
        return VLLMValidationError(failure.message, parameter=failure.field)
    if failure.status == 422:
        return VLLMUnprocessableEntityError(failure.message, parameter=failure.field)
    return GenerationError(failure.message)


def raise_engine_failures(engine_client: Any) -> None:
    """Make ``engine_client.generate`` raise the labelled failures (idempotent)."""
    if engine_client is None or getattr(engine_client, "_vsteer_failures", False):
        return
    generate = engine_client.generate

    async def labelled(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for out in generate(*args, **kwargs):
            if out.finished:
                for choice in out.outputs:
                    failure = parse_failure(choice.stop_reason) if choice.finish_reason == "error" else None
                    if failure is not None:
                        raise failure_error(failure)
            yield out

    engine_client.generate = labelled
    engine_client._vsteer_failures = True
