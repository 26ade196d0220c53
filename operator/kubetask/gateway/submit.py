"""`POST /v1/tasks` as a plain ASGI handler in front of FastAPI.

Submission is the hottest route by far, and FastAPI's routing, middleware stack and request
objects cost more CPU than the submission itself; this path reads the body, authenticates,
validates with the same model and answers with the same errors (`errors.py`). The OpenAPI
document still describes the route (`app.py` adds it from the same models).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import metrics, queues, strict_json, submission
from ..auth import Principal, TokenBook
from ..models import TaskPhase, TaskSubmission
from ..plane import DataPlane
from ..settings import Settings
from ..store import TaskExists
from . import errors, params
from .errors import ApiError
from .fair_gate import FairGate
from .guard import authorization
from .record_quota import RecordQuota
from .store_room import RETRY_AFTER, StoreFull, StoreRoom
from .throttle import Throttle, Throttled

PATH = "/v1/tasks"
_JSON_HEADERS = [(b"content-type", b"application/json")]
log = logging.getLogger("kubetask.gateway")


class SubmitRoute:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        tokens: TokenBook,
        plane: Callable[[], DataPlane],
        throttle: Callable[[], Throttle],
        records: Callable[[], RecordQuota],
        store: Callable[[], StoreRoom],
        gate: FairGate,
    ) -> None:
        self.app = app
        self._throttle = throttle
        self._records = records
        self._store = store
        self.settings = settings
        self.tokens = tokens
        self.plane = plane
        # The limit applies to the payload; leave room for the envelope around it.
        self.max_body = settings.max_payload_bytes + 64 * 1024
        self.gate = gate  # shared with every other request (`fair_gate.py`)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body, location = await self._submit(scope, receive)
        except Exception as err:
            response = errors.render(err)
            if response is None:
                log.error("unhandled error in submit", exc_info=err)
                response = errors.internal_error(err)
            await response(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 202,
                "headers": [
                    *_JSON_HEADERS,
                    (b"content-length", str(len(body)).encode()),
                    (b"location", location),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @property
    def throttle(self) -> Throttle:
        return self._throttle()

    @property
    def records(self) -> RecordQuota:
        return self._records()

    @property
    def store(self) -> StoreRoom:
        return self._store()

    async def _read(self, scope: Scope, receive: Receive) -> tuple[Principal, bytes]:
        """The caller (checked before the body is read) and the body, refused when too large
        (a declared Content-Length was checked by `guard.Guard`; this counts what arrives)."""
        who = self.tokens.from_header(authorization(scope))
        chunks = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise errors.body_too_large(size, self.max_body, self.settings.max_payload_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return who, b"".join(chunks)

    async def _submit(self, scope: Scope, receive: Receive) -> tuple[bytes, bytes]:
        """The accepted task, and where it is read from (its id and account went through the
        names' grammar, so neither can break out of the header)."""
        who, raw = await self._read(scope, receive)
        account = None
        if query := scope["query_string"]:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            params.only_documented(pairs, ("account",))
            account = pairs[0][1] if pairs else None
        acct = who.one_account(account)
        async with self.gate.turn(acct):
            return await self._accept(acct, raw)

    async def _accept(self, acct: str, raw: bytes) -> tuple[bytes, bytes]:
        try:
            # Parsed first so NaN, Infinity and keys given twice are refused (the model's own
            # parser would take them into an untyped payload).
            doc = strict_json.loads(raw)
        except strict_json.NotJson as err:
            raise ApiError(400, f"malformed JSON body: {err}") from None
        try:
            body = TaskSubmission.model_validate(doc)
        except ValidationError as err:
            raise RequestValidationError(err.errors()) from None
        plane = self.plane()
        fn = plane.registry.function(acct, body.function)
        if fn is None:
            raise ApiError(
                404,
                f"function {body.function!r} is not registered in account {acct!r}; "
                "register it first (kubetask functions apply -f FILE)",
                field="function",
            )
        try:
            submission.check_payload(body.payload, self.settings.max_payload_bytes)
        except submission.PayloadRefused as err:
            raise ApiError(err.status, str(err), field="payload") from None
        try:
            self.store.admit()
        except StoreFull as err:
            raise ApiError(507, str(err), extra={"retryAfter": RETRY_AFTER}) from None
        try:
            self.records.admit(acct)
            await self.throttle.admit(fn)
        except Throttled as err:
            metrics.THROTTLED.labels(acct, fn.name, err.reason).inc()
            raise ApiError(
                429, f"{err}; retry later", extra={"retryAfter": err.retry_after}
            ) from None
        try:
            created = await submission.submit(plane, fn, body.id, body.payload)
        except TaskExists as err:
            existing = err.existing.record.task
            raise ApiError(
                409,
                f"task {existing.id!r} already exists; it was not submitted again",
                field="id",
                extra={"task": existing.model_dump(mode="json")},
            ) from None
        except queues.QueueFull as err:
            metrics.THROTTLED.labels(acct, fn.name, "queue-full").inc()
            raise ApiError(429, f"queue of {acct}/{fn.name} is full ({err}); retry later") from None
        except queues.QueueUnavailable as err:
            raise ApiError(
                503, f"queue of {acct}/{fn.name} is unavailable ({err}); not accepted, retry later"
            ) from None
        self.records.created(acct, len(created.raw))
        task = created.record.task
        task.status.phase = TaskPhase.Queued
        return task.model_dump_json().encode(), f"{PATH}/{task.id}?account={acct}".encode()


def openapi_operation(refs: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    """The route's entry in the OpenAPI document, from the same models FastAPI describes."""
    error = {"content": {"application/json": {"schema": {"$ref": f"{refs}ErrorBody"}}}}
    return {
        "tags": ["tasks"],
        "summary": "Submit a task",
        "operationId": "submit_task",
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"{refs}TaskSubmission"}}},
        },
        "responses": {
            "202": {
                "description": "Accepted: queued, with its id",
                "headers": {
                    "Location": {
                        "description": "Where the task is read: `/v1/tasks/{id}?account=...`",
                        "schema": {"type": "string"},
                    }
                },
                "content": {"application/json": {"schema": {"$ref": f"{refs}Task"}}},
            },
            **{
                str(code): {"description": why, **error}
                for code, why in (
                    (400, "Malformed JSON"),
                    (401, "Missing or invalid token"),
                    (404, "Unknown function or account"),
                    (408, "The request did not arrive whole in time; nothing was accepted"),
                    (409, "A task with this id exists"),
                    (413, "Payload too large"),
                    (415, "Not a JSON body"),
                    (422, "Invalid field"),
                    (
                        429,
                        "Over the account's backlog, rate or record quota, or the queue is full",
                    ),
                    (431, "The request line and headers are over the limit; nothing was read"),
                    (503, "NATS or the queue is unavailable; nothing was accepted"),
                    (507, "The platform's storage is (nearly) full; nothing was accepted"),
                )
            },
        },
    }
