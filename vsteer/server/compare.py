"""``steering_compare``: one request answered steered and unsteered, side by side.

A ``/v1/completions`` or ``/v1/chat/completions`` body with ``"steering_compare": true`` is split
into two bodies, each of which then passes the edge like any request (resolution, tenancy, metrics):
the steered one as sent, and an unsteered one that says ``"steering": null``. Both carry the same
prompt, sampling parameters and ``seed`` (a random 31-bit int the server picks when the body has
none). They run concurrently, so that they land in the same engine batch, and their two JSON
answers are merged: the steered response, unchanged, plus
``"unsteered": {"choices": [...], "usage": {...}, "seed": <int>}``. A half answered with a status
other than 200 is passed on as it is (the steered half's first).
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vsteer._errors import SpecError
from vsteer.server.http import error_body

__all__ = ["COMPARE_FIELD", "COMPARE_PATHS", "ComparePair", "no_steering", "run_pair", "split_compare"]

COMPARE_FIELD = "steering_compare"
#: Routes that answer ``steering_compare`` (their responses have ``choices`` and ``usage``).
COMPARE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
#: Added to the unsteered half's request id (header or body), so the two halves never share one.
UNSTEERED_SUFFIX = "-unsteered"

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
#: Runs one half: (scope, receive, send).
Half = Callable[[dict, Receive, Send], Awaitable[None]]


@dataclass
class ComparePair:
    """The two bodies of a compare request, and the seed both use."""

    steered: dict
    unsteered: dict
    seed: Any


def split_compare(body: dict, path: str) -> ComparePair | None:
    """Take ``steering_compare`` out of a client body. None when it is absent or false (the body
    then goes on as if it had never had the field); else the two bodies to run.

    Raises:
        SpecError: ``steering_compare`` is not a boolean, is true on a route other than
            :data:`COMPARE_PATHS`, or is true with ``stream``.
    """
    if COMPARE_FIELD not in body:
        return None
    flag = body.pop(COMPARE_FIELD)
    if not isinstance(flag, bool):
        raise SpecError(f"must be true or false, not {json.dumps(flag)[:80]}", field=COMPARE_FIELD)
    if not flag:
        return None
    if path not in COMPARE_PATHS:
        raise SpecError(f"served on {' and '.join(sorted(COMPARE_PATHS))} only, not on {path}",
                        field=COMPARE_FIELD)
    if body.get("stream") not in (None, False):
        raise SpecError("not with stream: true (its two answers come back together, as one response)", field=COMPARE_FIELD)
    if body.get("seed") is None:
        body["seed"] = secrets.randbelow(2**31)
    unsteered = copy.deepcopy(body)
    unsteered.pop("steering", None)
    xargs = unsteered.get("vllm_xargs")
    if isinstance(xargs, dict):
        unsteered["vllm_xargs"] = {k: v for k, v in xargs.items() if k != "steering"}
    unsteered["steering"] = None  # exactly as if the client had said "steering": null
    if isinstance(unsteered.get("request_id"), str):
        unsteered["request_id"] += UNSTEERED_SUFFIX
    return ComparePair(body, unsteered, body["seed"])


def no_steering() -> SpecError:
    """The refusal of ``steering_compare: true`` on a request that resolves to no steering."""
    return SpecError('needs steering to compare against: give a spec in "steering" (this request '
                     'has none, or says "steering": null, and the server has no --default-steering)',
                     field=COMPARE_FIELD)


@dataclass
class _Captured:
    """One half's response, kept instead of sent."""

    status: int | None = None
    headers: list = field(default_factory=list)
    messages: list = field(default_factory=list)

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
        self.messages.append(message)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")


class _SharedReceive:
    """One client's ``receive`` shared by both halves: after the body (which each half gets from
    its own replay), the client's disconnect is given to both."""

    def __init__(self, receive: Receive) -> None:
        import anyio

        self._receive = receive
        self._lock = anyio.Lock()
        self._message: dict | None = None

    async def __call__(self) -> dict:
        async with self._lock:
            if self._message is not None:
                return self._message
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._message = message
            return message


def _half_scope(scope: dict, suffix: str) -> dict:
    """A copy of ``scope`` for one half: its own request state, and a request-id header with
    ``suffix`` (vLLM names a request by that header when the client sends one)."""
    half = dict(scope)
    if isinstance(scope.get("state"), dict):
        half["state"] = dict(scope["state"])
    if suffix:
        half["headers"] = [(k, v + suffix.encode() if k.lower() == b"x-request-id" else v) for k, v in scope["headers"]]
    return half


def merge(steered: bytes, unsteered: bytes, seed: Any) -> bytes | None:
    """The steered response with ``unsteered`` added, or None when either is not a JSON object."""
    try:
        out, other = json.loads(steered), json.loads(unsteered)
    except ValueError:
        return None
    if not isinstance(out, dict) or not isinstance(other, dict):
        return None
    out["unsteered"] = {"choices": other.get("choices"), "usage": other.get("usage"), "seed": seed}
    return json.dumps(out).encode()


async def run_pair(halves: Sequence[Half], scope: dict, receive: Receive, send: Send, seed: Any) -> None:
    """Run the steered and the unsteered half concurrently and send one merged response."""
    import anyio

    shared = _SharedReceive(receive)
    captured = (_Captured(), _Captured())
    async with anyio.create_task_group() as group:
        for half, suffix, out in zip(halves, ("", UNSTEERED_SUFFIX), captured):
            group.start_soon(half, _half_scope(scope, suffix), shared, out.send)
    if any(c.status is None for c in captured):
        return  # a half sent nothing: the client went away
    failed = next((c for c in captured if c.status != 200), None)
    if failed is not None:
        for message in failed.messages:
            await send(message)
        return
    steered, unsteered = captured
    payload = await anyio.to_thread.run_sync(merge, steered.body(), unsteered.body(), seed)
    if payload is None:
        payload = error_body(502, "steering_compare: a half's response was not a JSON object, so the two could not be merged", COMPARE_FIELD)
        headers = [(b"content-type", b"application/json")]
        status = 502
    else:
        headers = [(k, v) for k, v in steered.headers if k.lower() != b"content-length"]
        status = 200
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
