"""How the API answers what it refuses: one JSON shape, `{"error": ..., "field": ...}`, for every
route, whether FastAPI dispatched it or the plain-ASGI submit path (`submit.py`) did."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..auth import OutOfScope, Unauthenticated
from ..states import IllegalTransition


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, field: str | None = None, extra: Any = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.extra = extra


def api_error(err: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"error": err.message}
    if err.field:
        body["field"] = err.field
    if err.extra is not None:
        body.update(err.extra)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


def invalid_request(err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return JSONResponse({"error": f"malformed JSON body: {detail}"}, status_code=400)
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid value")
    if first.get("type") == "string_pattern_mismatch" and loc.endswith("id"):
        msg = (
            "task id may use only letters, digits, '-' and '_' (1-128 chars, starting alphanumeric)"
        )
    return JSONResponse({"error": f"{loc}: {msg}", "field": loc}, status_code=422)


def unauthenticated(err: Unauthenticated) -> JSONResponse:
    return api_error(ApiError(401, str(err)))


def out_of_scope(err: OutOfScope) -> JSONResponse:
    return JSONResponse({"error": f"account {err.args[0]!r} not found"}, status_code=404)


def illegal_transition(err: IllegalTransition) -> JSONResponse:
    return JSONResponse({"error": str(err), "phase": err.current.value}, status_code=409)


def body_too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"request body is {size} bytes; payloads are limited to {limit} bytes")


def render(err: Exception) -> JSONResponse | None:
    """The answer to an error a route raised, or None for one that is a bug (a 500)."""
    if isinstance(err, ApiError):
        return api_error(err)
    if isinstance(err, RequestValidationError):
        return invalid_request(err)
    if isinstance(err, Unauthenticated):
        return unauthenticated(err)
    if isinstance(err, OutOfScope):
        return out_of_scope(err)
    if isinstance(err, IllegalTransition):
        return illegal_transition(err)
    return None
