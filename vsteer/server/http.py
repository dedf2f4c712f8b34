"""Small ASGI helpers shared by the steering middleware and the vector registry: error bodies,
reading a whole request body and sending a JSON response."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

__all__ = ["error_body", "error_type", "read_body", "respond"]


#: The error ``type`` of each status, as OpenAI's API (and its client's exception classes) name them.
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          409: "ConflictError", 422: "UnprocessableEntityError", 429: "RateLimitError", 500: "InternalServerError",
          503: "ServiceUnavailableError"}


def error_type(status: int) -> str:
    """``BadRequestError`` for 400, ``NotFoundError`` for 404, ...: the type that names ``status``."""
    if status in _TYPES:
        return _TYPES[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "InternalServerError" if status >= 500 else "BadRequestError"
    return "".join(word.capitalize() for word in phrase.replace("-", " ").split()) + "Error"


def error_body(status: int, message: str, param: str | None) -> bytes:
    """An OpenAI-style error payload whose ``type`` matches ``status``."""
    return json.dumps({"error": {"message": message, "type": error_type(status), "param": param, "code": status}}).encode()


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
