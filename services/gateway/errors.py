"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with a 4xx/5xx."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error to return to the client as OpenAI error JSON."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def validation_error(exc: RequestValidationError) -> APIError:
    """A request model's validation errors as one 400 naming the first bad field."""
    errors = exc.errors()
    if not errors:
        return invalid("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return invalid(f"request body is not valid JSON: {ctx}".rstrip(": "), code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing" and not loc:
        return invalid("request body is required and must be a JSON object", code="invalid_json")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return invalid(f"{param}: {msg}{more}" if param else f"{msg}{more}", param=param)
