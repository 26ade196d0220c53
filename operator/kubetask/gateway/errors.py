"""How the API answers what it refuses: one JSON shape (`models.ErrorBody`) for every status,
whether FastAPI dispatched the request, the plain-ASGI submit path (`submit.py`) did, or the
framework refused it before any route (unknown path, wrong method). NATS being away is a 503
with `Retry-After`, never a 500."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats.js import errors as js_errors
from starlette.exceptions import HTTPException

from .. import grammar, jetstream, queues, quotas
from ..auth import OutOfScope, Unauthenticated
from ..models import ErrorBody
from ..states import IllegalTransition
from . import store_room

# Seconds a client is asked to wait when NATS is away or a queue refuses work.
RETRY_AFTER = 1
# NATS did not answer (in time), or a queue did not take the message: nothing was done.
UNAVAILABLE: tuple[type[BaseException], ...] = (*jetstream.UNAVAILABLE, queues.QueueUnavailable)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, field: str | None = None, extra: Any = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.extra = extra


def respond(status: int, body: ErrorBody) -> JSONResponse:
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if body.retryAfter is not None:
        headers["Retry-After"] = str(body.retryAfter)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status, headers)


def api_error(err: ApiError) -> JSONResponse:
    extra = dict(err.extra or {})
    retry = extra.pop("retryAfter", RETRY_AFTER if err.status in (429, 503) else None)
    body = ErrorBody(error=err.message, field=err.field, retryAfter=retry, **extra)
    return respond(err.status, body)


def unavailable(what: str) -> ApiError:
    return ApiError(503, f"{what}; nothing was changed, retry in {RETRY_AFTER}s")


def invalid_request(err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return respond(400, ErrorBody(error=f"malformed JSON body: {detail}"))
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid value")
    if first.get("type", "").startswith("string_") and loc.endswith("id"):
        msg = f"task id may use only {grammar.TASK_ID_RULE}"
    elif first.get("type") == "string_pattern_mismatch":
        msg = grammar.RULES.get(first.get("ctx", {}).get("pattern"), msg)
    return respond(422, ErrorBody(error=f"{loc}: {msg}" if loc else msg, field=loc or None))


def framework_error(err: HTTPException) -> JSONResponse:
    """What Starlette refuses before any route: an unknown path (404), a method the path does
    not have (405)."""
    detail = err.detail if isinstance(err.detail, str) else "request refused"
    response = respond(err.status_code, ErrorBody(error=detail))
    if err.headers:
        response.headers.update(err.headers)
    return response


def no_such_path(path: str) -> str:
    """Said for a path no route has, most often an id with a `/` in it (`kubetask get ../x`):
    Starlette's bare "Not Found" read as if a task of that name were missing."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    return (
        f"no such path {shown!r} (a name or task id is never empty and never holds a '/'); "
        "the API is described at /openapi.json"
    )


def unauthenticated(err: Unauthenticated) -> JSONResponse:
    return api_error(ApiError(401, str(err)))


def out_of_scope(err: OutOfScope) -> JSONResponse:
    return respond(404, ErrorBody(error=f"account {err.args[0]!r} not found"))


def illegal_transition(err: IllegalTransition) -> JSONResponse:
    return respond(409, ErrorBody(error=str(err), phase=err.current))


def internal_error(_: BaseException) -> JSONResponse:
    return respond(500, ErrorBody(error="internal error; it is logged"))


def body_too_large(size: int, body_limit: int, payload_limit: int) -> ApiError:
    """Names the bound a body was held to: a function's or config's body, which has no payload,
    may pass the payload limit by the envelope's room, and was told the payload's alone."""
    return ApiError(
        413,
        f"request body is {size} bytes; a request body may be at most {body_limit} bytes"
        f" (a task's payload at most {payload_limit})",
    )


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
    if isinstance(err, HTTPException):
        return framework_error(err)
    if isinstance(err, js_errors.APIError) and err.err_code in jetstream.NO_ROOM:
        said = "JetStream's storage is full: nothing is written until tasks are deleted or expire"
        return api_error(ApiError(507, said, extra={"retryAfter": store_room.RETRY_AFTER}))
    if isinstance(err, UNAVAILABLE):
        return api_error(unavailable(f"NATS is unavailable ({type(err).__name__})"))
    if isinstance(err, (queues.TooManyFunctions, quotas.OverQuota)):
        return api_error(ApiError(409, str(err)))
    return None
