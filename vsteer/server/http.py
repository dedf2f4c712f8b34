"""Small ASGI helpers shared by the steering middleware and the vector registry: error bodies,
reading a whole request body and sending a JSON response."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["error_body", "read_body", "respond"]


def error_body(status: int, message: str, param: str | None) -> bytes:
    """An OpenAI-style error payload."""
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}}).encode()


async def read_body(receive: Any, limit: int | None = None) -> bytes:
    """The whole request body (raises ``OverflowError`` past ``limit`` bytes)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise OverflowError(size)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(send: Any, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
