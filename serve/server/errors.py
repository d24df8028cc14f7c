"""One mapping of every exception to the OpenAI error shape.

``{"error": {"message", "type", "param", "code"}}`` with the status code: client mistakes are
4xx and name the offending value; only the engine failing is a 500.
"""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from serve.scheduler import QueueFull

log = logging.getLogger("sunjax.serve")

# status -> OpenAI error type
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error with its HTTP status, the request field at fault and a machine code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# union members pydantic names in an error's location (``prompt.str``)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal"}


def field_path(loc: tuple) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("body",):
            out += f".{part}" if out else str(part)
    return out


def from_validation(errors: list[dict]) -> APIError:
    """The first pydantic error as a 400 naming the field and the value it got."""
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    # a union (``str | list[int]``) reports each member; the field is what matters
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))
    param = field_path(loc) or None
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}", param=param, code="unrecognized_parameter")
    if err.get("type") == "missing":
        return APIError(400, f"missing required field {param!r}", param=param, code="missing")
    value = err.get("input")
    shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
    return APIError(
        400,
        f"{param}: {err.get('msg', 'invalid value')} (got {shown})",
        param=param,
        code="invalid_value",
    )


def to_error(exc: BaseException) -> APIError:
    """THE mapping from exceptions to API errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return from_validation(list(exc.errors()))
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return APIError(404, "no such route", code="not_found")
        if exc.status_code == 405:
            return APIError(405, "method not allowed for this route", code="method_not_allowed")
        return APIError(exc.status_code, str(exc.detail))
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    log.exception("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def error_response(exc: BaseException) -> JSONResponse:
    err = to_error(exc)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
