"""The HTTP API. Request and response bodies are the models of `kubetask.models`, so the served
OpenAPI document (/openapi.json) describes the same objects as the CRDs.

Every call is authenticated with a bearer token bound to an account; a tenant's token reaches only
its own account, and asking for another account's objects answers 404 as if they did not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp

from .. import (
    actions,
    grammar,
    logs,
    names,
    quarantine,
    queues,
    record_reports,
    registrant,
    task_events,
)
from ..auth import OutOfScope, Principal, TokenBook, Unauthenticated
from ..cancellation import cancel_and_wait
from ..dispatch.destinations import config_problem
from ..metrics import exposition, is_scraper
from ..models import (
    AccountLimits,
    AsyncConfig,
    ErrorBody,
    ObjectMeta,
    QueueLoad,
    Task,
    TaskEvent,
    TaskFunction,
    TaskFunctionStatus,
    TaskList,
    TaskPhase,
    TaskSubmission,
)
from ..plane import DataPlane
from ..queue_routes import Router
from ..registry import ConfigConflict, Registry
from ..runtime import quiet_gc
from ..settings import Settings
from ..states import TERMINAL, IllegalTransition
from ..store import Unreadable, Versioned, now
from . import api_docs, errors, openapi_links, params, submit, task_pages, waiting
from .change_rate import ChangeRate, ChangesThrottled
from .errors import ApiError
from .expiry import Expiry
from .fair_gate import FairGate, GatedRequests
from .guard import Guard
from .history_quota import HistoryQuota
from .index import Query as IndexQuery
from .indexing import Indexer
from .json_bodies import StrictJsonRoute
from .log_streams import LogStreams
from .queue_looks import QueueLooks
from .record_quota import RecordQuota
from .store_room import StoreRoom
from .submit import SubmitRoute
from .sweeper import sweep_forever
from .throttle import THROTTLE_FROM, Throttle

JSON = "application/json"
# How long after its task finished a log's final line can still be on its way (published
# without waiting, `logs.LogWriter`), with room for clocks apart between hosts.
FINAL_LINE_SETTLES = timedelta(seconds=10)


def _json(model: Any, status: int = 200) -> Response:
    return Response(model.model_dump_json(exclude_none=False), status_code=status, media_type=JSON)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody}
    for code in (400, 401, 404, 408, 409, 413, 415, 422, 429, 431, 503, 507)
}
log = logging.getLogger("kubetask.gateway")


async def principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The caller, for every /v1 route; then the route's query parameters are checked, so a
    stranger gets 401 before any 422."""
    tokens: TokenBook = request.app.state.tokens
    who = tokens.from_header(authorization)
    if request.scope["query_string"]:
        _documented_query(request)
    return who


def _documented_query(request: Request) -> None:
    """A /v1 route takes only the query parameters its OpenAPI operation lists (HEAD is its
    GET by now). `/healthz` and `/metrics`, which probes and scrapers configured elsewhere
    call, are not checked."""
    path = getattr(request.scope.get("route"), "path", "")
    if not path.startswith("/v1/"):
        return
    documented: dict[tuple[str, str], frozenset[str]] | None = getattr(
        request.app.state, "documented_queries", None
    )
    if documented is None:
        documented = params.documented_queries(request.app.openapi())
        request.app.state.documented_queries = documented
    allowed = documented.get((request.method, path), frozenset())
    params.only_documented(request.query_params.multi_items(), allowed)


Who = Annotated[Principal, Depends(principal)]
_PHASE = "(" + "|".join(p.value for p in TaskPhase) + ")"
PHASES_PATTERN = rf"^(\s*{_PHASE}\s*(,\s*{_PHASE}\s*)*)?$"
# An empty filter or account parameter is the same as none.
OPTIONAL_NAME = f"^({grammar.NAME_PATTERN[1:-1]})?$"
CURSOR = f"^({grammar.NAME_PATTERN[1:-1]}/{grammar.TASK_ID_PATTERN[1:-1]})?$"
# Path parameters are documented with the grammar but checked by the routes (`params.py`): a
# lookup by a name that cannot exist is a 404, as for one that does not, not a 422.
TaskIdPath = Annotated[
    str,
    PathParam(
        description=f"Task id: {grammar.TASK_ID_RULE}.",
        json_schema_extra={"pattern": grammar.TASK_ID_PATTERN, "maxLength": grammar.TASK_ID_MAX},
    ),
]
NamePath = Annotated[
    str,
    PathParam(
        description=f"Name: {grammar.NAME_RULE}.",
        json_schema_extra={"pattern": grammar.NAME_PATTERN, "maxLength": grammar.NAME_MAX},
    ),
]
TimeParam = Query(
    description="RFC 3339 time with a zone (Z or +hh:mm).",
    json_schema_extra={"format": "date-time"},
)
REFS = "#/components/schemas/"
Paged = TypeVar("Paged")
NAME_CURSOR = f"^({grammar.NAME_PATTERN[1:-1]}/{grammar.NAME_PATTERN[1:-1]})?$"
PageLimit = Annotated[int, Query(ge=1, le=1000, description="Objects per page.")]
PageCursor = Annotated[
    str | None,
    Query(
        description="The `Next-Cursor` header of the previous page.",
        json_schema_extra={"pattern": NAME_CURSOR},
    ),
]


def _page(
    objects: Mapping[tuple[str, str], Paged],
    scoped: str | None,
    limit: int,
    cursor: str | None,
    size: Callable[[tuple[str, str]], int],
    max_bytes: int,
) -> tuple[list[Paged], str | None]:
    """Up to `limit` objects after `cursor` in (account, name) order (of `scoped`'s account, or
    of all), and the cursor of the next page if there is one. Like a page of tasks, it ends
    before the object that would take it past `max_bytes` as stored (one at least): an admin's
    page spans accounts, each of which may store 16 MiB of them."""
    after = params.name_cursor(cursor)
    keys = sorted(k for k in objects if scoped in (None, k[0]) and (after is None or k > after))
    taken, held = 0, 0
    for key in keys:
        held += size(key)
        if taken == limit or (taken and held > max_bytes):
            return [objects[k] for k in keys[:taken]], "/".join(keys[taken - 1])
        taken += 1
    return [objects[k] for k in keys], None


def _stored_size(registry: Registry, kind: str) -> Callable[[tuple[str, str]], int]:
    return lambda key: registry.object_bytes(kind, *key)


def _page_response(items: list[Any], next_cursor: str | None) -> Response:
    headers = {"Next-Cursor": next_cursor} if next_cursor else None
    # Compact, as every other answer (pydantic's JSON): a page may hold 16 MiB of objects.
    return Response(json.dumps(items, separators=(",", ":")), media_type=JSON, headers=headers)


ACCOUNT_HELP = "Account to act on; tenants may omit it (their own)."
AccountParam = Annotated[
    str | None, Query(description=ACCOUNT_HELP, json_schema_extra={"pattern": OPTIONAL_NAME})
]
# The same parameter, described by hand for the plain-ASGI submit route.
ACCOUNT_QUERY = {
    "name": "account",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "pattern": OPTIONAL_NAME},
    "description": ACCOUNT_HELP,
}


async def _render(request: Request, err: Exception) -> Response:
    if isinstance(err, HTTPException) and err.status_code == 405:
        err.headers = {"Allow": ", ".join(sorted(_methods(request)))}
    if isinstance(err, HTTPException) and err.status_code == 404 and err.detail == "Not Found":
        err.detail = errors.no_such_path(request.url.path)
    response = errors.render(err)
    if response is None:
        log.error("unhandled error", exc_info=err)
        return errors.internal_error(err)
    return response


async def keep_poison_forever(plane: DataPlane, indexer: Indexer) -> None:
    """Quarantine what the index could not read, once it has met it."""
    while True:
        await indexer.poison_found.wait()
        indexer.poison_found.clear()
        while indexer.index.poisoned:
            await quarantine.keep(plane.js, indexer.index.poisoned.pop(0))


def _methods(request: Request) -> set[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first
    route's, and FastAPI has a route per method)."""
    scope = {**request.scope, "method": "GET"}
    found: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            found |= getattr(route, "methods", None) or set()
    if request.url.path == submit.PATH:
        found.add("POST")  # served in front of the router (submit.py)
    if "GET" in found:
        found.add("HEAD")  # served as the GET (guard.py)
    return found


def create_app(settings: Settings, tokens_file: Path) -> ASGIApp:
    state: dict[str, Any] = {}
    log_streams = LogStreams(settings.account_max_log_streams)
    change_rate = ChangeRate(settings.account_max_changes, settings.account_changes_burst)
    max_bytes = settings.page_max_bytes  # of a page of tasks, functions or configs

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        plane = await DataPlane.connect(settings, "kubetask-gateway", fail_fast=True)
        indexer = Indexer(plane)
        await indexer.start()
        sweeper = asyncio.create_task(sweep_forever(plane, indexer))
        poison = asyncio.create_task(keep_poison_forever(plane, indexer))
        resuming = asyncio.create_task(
            plane.mover.resume_all(list(plane.registry.functions.values()))
        )
        routing = asyncio.create_task(Router(plane).run())
        expiring = asyncio.create_task(Expiry(plane, indexer).forever())
        quotas = [
            asyncio.create_task(quota.run())
            for quota in (HistoryQuota.of_logs(plane), HistoryQuota.of_events(plane))
        ]
        quotas.append(
            asyncio.create_task(
                record_reports.report_forever(plane.nc, indexer, settings.account_max_record_bytes)
            )
        )
        store = StoreRoom(plane)
        await store.read()
        quotas.append(asyncio.create_task(store.run()))
        quiet_gc()
        state.update(
            plane=plane,
            indexer=indexer,
            throttle=Throttle(settings, plane.depth),
            records=RecordQuota(settings.account_max_record_bytes, indexer),
            store=store,
            looks=QueueLooks(plane),
        )
        try:
            yield
        finally:
            await cancel_and_wait(sweeper, poison, resuming, routing, expiring, *quotas)
            await indexer.stop()
            await plane.close()

    app = FastAPI(
        title="kubetask",
        version="v1alpha1",
        description="Asynchronous tasks on NATS JetStream. "
        "Authenticate with `Authorization: Bearer <token>`.",
        lifespan=lifespan,
        responses=ERRORS,
        # `/v1/tasks/` was redirected to `/v1/tasks` at the Host the client sent (a redirect to
        # anywhere, for whoever sets the header), with no error body: a path is as it is named.
        redirect_slashes=False,
        # FastAPI's pages load a floating version of their code from a CDN (`api_docs.py`).
        docs_url=None,
        redoc_url=None,
    )
    app.router.route_class = StrictJsonRoute
    app.state.tokens = TokenBook(tokens_file)
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The generated document, plus the plain-ASGI submit route and its body schema."""
        if app.openapi_schema is None:
            doc = generate_openapi()
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in (TaskSubmission, Task, ErrorBody):
                schema = model.model_json_schema(ref_template=REFS + "{model}")
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            operation = submit.openapi_operation(REFS, [ACCOUNT_QUERY])
            doc["paths"].setdefault(submit.PATH, {})["post"] = operation
            openapi_links.add(doc)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    def plane() -> DataPlane:
        p: DataPlane = state["plane"]
        return p

    def indexer() -> Indexer:
        i: Indexer = state["indexer"]
        return i

    # -- errors ---------------------------------------------------------------------------------

    handled = (ApiError, RequestValidationError, Unauthenticated, OutOfScope, IllegalTransition)
    for kind in (*handled, HTTPException, *errors.UNAVAILABLE, Exception):
        app.add_exception_handler(kind, _render)

    async def load_task(p: Principal, account: str | None, task_id: str) -> Versioned:
        acct = p.one_account(account)
        try:
            current = await plane().store.get(acct, params.task_id(task_id, acct))
        except Unreadable as err:
            await quarantine.keep(plane().js, quarantine.unreadable(err))
            raise ApiError(
                404, f"task {task_id!r} has an unreadable record; it is quarantined"
            ) from None
        if current is None:
            raise ApiError(404, f"task {task_id!r} not found in account {acct!r}")
        return current

    # -- tasks ----------------------------------------------------------------------------------

    @app.get("/v1/tasks/{task_id}", response_model=Task, tags=["tasks"])
    async def get_task(task_id: TaskIdPath, who: Who, account: AccountParam = None) -> Response:
        task = (await load_task(who, account, task_id)).record.task
        if task.status.phase in waiting.WAITING:
            await indexer().caught_up()
            task.status.waiting = await waiting.explain(plane(), indexer(), state["looks"], task)
        return _json(task)

    @app.get("/v1/tasks", response_model=TaskList, tags=["tasks"])
    async def list_tasks(
        who: Who,
        account: AccountParam = None,
        function: Annotated[str | None, Query(json_schema_extra={"pattern": OPTIONAL_NAME})] = None,
        status: Annotated[
            str | None,
            Query(
                description="Phase, or several separated by commas.",
                json_schema_extra={"pattern": PHASES_PATTERN},
            ),
        ] = None,
        startedAfter: Annotated[str | None, TimeParam] = None,
        startedBefore: Annotated[str | None, TimeParam] = None,
        idPrefix: Annotated[
            str, Query(max_length=grammar.TASK_ID_MAX, pattern=grammar.ID_PREFIX_PATTERN)
        ] = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[str | None, Query(json_schema_extra={"pattern": CURSOR})] = None,
    ) -> Response:
        """Tasks in id order, at most `limit` a page and at most `KUBETASK_PAGE_MAX_BYTES`
        (4 MiB) of records (one task at least, whatever its size), so a page may hold fewer
        than `limit` while more follow: follow `cursor` until it is null."""
        scoped = who.scope(account)
        phases = None
        if status:
            by_name = {p.value.lower(): p for p in TaskPhase}  # `succeeded`, as people type it
            try:
                phases = frozenset(by_name[s.strip().lower()] for s in status.split(","))
            except KeyError:
                raise ApiError(
                    422,
                    f"unknown status in {status!r}; use one of "
                    f"{', '.join(p.value for p in TaskPhase)}",
                    field="status",
                ) from None
        after = params.cursor(cursor)
        q = IndexQuery(
            accounts=None if scoped is None else [scoped],
            function=params.function_filter(function),
            phases=phases,
            started_after=params.time("startedAfter", startedAfter),
            started_before=params.time("startedBefore", startedBefore),
            id_prefix=idPrefix,
        )
        await indexer().caught_up()
        index = indexer().index

        rows, nxt = await indexer().query(scoped, index.search, q, limit, after, max_bytes)
        body, unreadable = task_pages.render(
            (
                (names.task_key(row.account, row.id), row.record, row.revision)
                for row in rows
                if row.record is not None and row.revision is not None
            ),
            f"{nxt[0]}/{nxt[1]}" if nxt else None,
        )
        for err in unreadable:
            await quarantine.keep(plane().js, quarantine.unreadable(err))
        return Response(body, media_type=JSON)

    @app.post("/v1/tasks/{task_id}/stop", response_model=Task, tags=["tasks"])
    async def stop_task(task_id: TaskIdPath, who: Who, account: AccountParam = None) -> Response:
        updated = await actions.stop(plane(), await load_task(who, account, task_id))
        return _json(updated.record.task)

    @app.post("/v1/tasks/{task_id}/pause", response_model=Task, tags=["tasks"])
    async def pause_task(task_id: TaskIdPath, who: Who, account: AccountParam = None) -> Response:
        updated = await actions.pause(plane(), await load_task(who, account, task_id))
        return _json(updated.record.task)

    @app.post("/v1/tasks/{task_id}/resume", response_model=Task, tags=["tasks"])
    async def resume_task(task_id: TaskIdPath, who: Who, account: AccountParam = None) -> Response:
        try:
            updated = await actions.resume(plane(), await load_task(who, account, task_id))
        except actions.FunctionMissing as err:
            raise ApiError(
                409, f"function {err.args[0]!r} no longer exists; cannot resume"
            ) from None
        return _json(updated.record.task)

    @app.delete("/v1/tasks/{task_id}", status_code=204, tags=["tasks"])
    async def delete_task(task_id: TaskIdPath, who: Who, account: AccountParam = None) -> Response:
        await actions.delete(plane(), await load_task(who, account, task_id))
        return Response(status_code=204)

    @app.get("/v1/tasks/{task_id}/events", response_model=list[TaskEvent], tags=["tasks"])
    async def get_task_events(
        task_id: TaskIdPath, who: Who, account: AccountParam = None
    ) -> list[TaskEvent]:
        """Every change of the task's record, oldest first: what happened to it, attempt by
        attempt (kept as long as the record; the newest 1,000)."""
        current = await load_task(who, account, task_id)
        task = current.record.task
        return await task_events.read(
            plane().nc, task.account, task.id, current.raw, current.revision
        )

    @app.get(
        "/v1/tasks/{task_id}/logs",
        tags=["tasks"],
        responses={200: {"content": {"application/x-ndjson": {}}}},
    )
    async def task_logs(
        task_id: TaskIdPath, who: Who, account: AccountParam = None, follow: bool = False
    ) -> StreamingResponse:
        current = await load_task(who, account, task_id)
        task = current.record.task

        finished = task.status.phase in TERMINAL
        # A finished task's log ends with its final line, which may still be on its way for a
        # moment; long after, a log without it lost it (its account's quota, the stream's cap)
        # and is read as it is, not waited on.
        ended = task.status.timestamps.finished
        settled = finished and ended is not None and now() - ended > FINAL_LINE_SETTLES
        idle = 2.0 if finished else 3600.0

        release = log_streams.open(task.account)

        async def gone_quiet() -> bool:
            """Whether the task ended long enough ago that its final line, had it been stored,
            would have been read by now (deleted counts as ended)."""
            try:
                latest = await plane().store.get(task.account, task.id)
            except Exception:
                return False
            if latest is None:
                return True
            status = latest.record.task.status
            at = status.timestamps.finished
            return status.phase in TERMINAL and at is not None and now() - at > FINAL_LINE_SETTLES

        async def lines() -> AsyncIterator[bytes]:
            try:
                wait = (follow or finished) and not settled
                records = logs.records(
                    plane().nc, task.account, task.id, wait, idle_timeout=idle, ended=gone_quiet
                )
                async with aclosing(records):
                    async for record in records:
                        yield json.dumps(record).encode() + b"\n"
            finally:
                release()

        # The release again after the answer: its lines may never have begun (a client gone
        # first, a HEAD).
        return StreamingResponse(
            lines(), media_type="application/x-ndjson", background=BackgroundTask(release)
        )

    # -- functions and async configs ------------------------------------------------------------

    def changing(who: Who, account: str) -> None:
        """A tenant's change of its registrations counts against its change rate."""
        if who.admin:
            return
        try:
            change_rate.take(account)
        except ChangesThrottled as err:
            raise ApiError(
                429,
                f"{err}; nothing was changed, retry in {err.retry_after}s",
                extra={"retryAfter": err.retry_after},
            ) from None

    def check_object(who: Who, account: str | None, name: str, meta: ObjectMeta) -> str:
        """Resolve the object's account (the caller's when the YAML names none) and check it."""
        acct = who.one_account(account or meta.namespace)
        meta_ns = meta.namespace = meta.namespace or acct
        if meta.name != name:
            raise ApiError(
                422,
                f"metadata.name {meta.name!r} does not match the URL ({name!r})",
                field="metadata.name",
            )
        if meta_ns != acct:
            raise ApiError(
                422,
                f"metadata.namespace {meta_ns!r} is not the account {acct!r}",
                field="metadata.namespace",
            )
        return acct

    async def function_status(fn: TaskFunction) -> TaskFunction:
        try:
            waiting, running = await queues.backlog(plane().js, fn)
            ready = True
        except Exception:
            waiting, running, ready = 0, 0, False
        assignment = fn.status.queueAssignment if fn.status is not None else None
        fn = fn.model_copy(deep=True)
        fn.status = TaskFunctionStatus(
            queue=names.queue_label(fn),
            queueAssignment=assignment,
            backlog=waiting + running,
            ready=ready,
        )
        return fn

    @app.put("/v1/functions/{name}", response_model=TaskFunction, tags=["functions"])
    async def put_function(
        name: NamePath, fn: TaskFunction, who: Who, account: AccountParam = None
    ) -> Response:
        acct = check_object(who, account, name, fn.metadata)
        registrant.mark(fn, who.admin)
        changing(who, acct)
        await plane().mover.register(plane().registry, fn)
        return _json(await function_status(plane().registry.with_route(fn)))

    @app.get("/v1/functions", response_model=list[TaskFunction], tags=["functions"])
    async def list_functions(
        who: Who, account: AccountParam = None, limit: PageLimit = 500, cursor: PageCursor = None
    ) -> Response:
        """A page of functions in (account, name) order, at most `limit` and at most
        `KUBETASK_PAGE_MAX_BYTES` of them as stored (one at least); `Next-Cursor` names the next
        page."""
        registry = plane().registry
        size = _stored_size(registry, "function")
        fns, nxt = _page(registry.functions, who.scope(account), limit, cursor, size, max_bytes)
        gate = asyncio.Semaphore(32)  # each status reads its queue's consumer

        async def status(fn: TaskFunction) -> TaskFunction:
            async with gate:
                return await function_status(fn)

        out = await asyncio.gather(*(status(f) for f in fns))
        return _page_response([f.model_dump(mode="json") for f in out], nxt)

    @app.get("/v1/functions/{name}", response_model=TaskFunction, tags=["functions"])
    async def get_function(name: NamePath, who: Who, account: AccountParam = None) -> Response:
        acct = who.one_account(account)
        fn = plane().registry.function(acct, params.object_name("function", name, acct))
        if fn is None:
            raise ApiError(404, f"function {name!r} not found in account {acct!r}")
        return _json(await function_status(fn))

    @app.delete("/v1/functions/{name}", status_code=204, tags=["functions"])
    async def delete_function(name: NamePath, who: Who, account: AccountParam = None) -> Response:
        acct = who.one_account(account)
        fn = plane().registry.function(acct, params.object_name("function", name, acct))
        if fn is None:
            raise ApiError(404, f"function {name!r} not found in account {acct!r}")
        await indexer().caught_up()  # a task submitted a moment ago counts too
        unfinished = IndexQuery([acct], function=name, phases=frozenset(TaskPhase) - TERMINAL)
        busy = await indexer().query(acct, indexer().index.count, acct, unfinished)
        if busy:
            raise ApiError(
                409,
                f"function {name!r} still has {busy} unfinished tasks; "
                "stop them or let them finish first",
            )
        changing(who, acct)
        await plane().registry.delete_function(acct, name)
        await queues.remove_function_queue(plane().js, fn)
        return Response(status_code=204)

    @app.put("/v1/asyncconfigs/{name}", response_model=AsyncConfig, tags=["asyncconfigs"])
    async def put_async_config(
        name: NamePath, cfg: AsyncConfig, who: Who, account: AccountParam = None
    ) -> Response:
        acct = check_object(who, account, name, cfg.metadata)
        problem = config_problem(cfg, plane().registry.function, settings.webhook_denied_networks)
        if problem is not None:
            raise ApiError(422, problem, field="spec.destinationConfig")
        changing(who, acct)
        try:
            await plane().registry.put_async_config(cfg)
        except ConfigConflict as err:
            raise ApiError(409, str(err)) from None
        await plane().registry.caught_up()
        return _json(cfg)

    @app.get("/v1/asyncconfigs", response_model=list[AsyncConfig], tags=["asyncconfigs"])
    async def list_async_configs(
        who: Who, account: AccountParam = None, limit: PageLimit = 500, cursor: PageCursor = None
    ) -> Response:
        """A page of async configs in (account, name) order, at most `limit` and at most
        `KUBETASK_PAGE_MAX_BYTES` of them as stored (one at least); `Next-Cursor` names the next
        page."""
        registry = plane().registry
        size = _stored_size(registry, "config")
        cfgs, nxt = _page(registry.configs, who.scope(account), limit, cursor, size, max_bytes)
        return _page_response([c.model_dump(mode="json") for c in cfgs], nxt)

    @app.get("/v1/asyncconfigs/{name}", response_model=AsyncConfig, tags=["asyncconfigs"])
    async def get_async_config(name: NamePath, who: Who, account: AccountParam = None) -> Response:
        acct = who.one_account(account)
        cfg = plane().registry.configs.get((acct, params.object_name("async config", name, acct)))
        if cfg is None:
            raise ApiError(404, f"async config {name!r} not found in account {acct!r}")
        return _json(cfg)

    @app.delete("/v1/asyncconfigs/{name}", status_code=204, tags=["asyncconfigs"])
    async def delete_async_config(
        name: NamePath, who: Who, account: AccountParam = None
    ) -> Response:
        acct = who.one_account(account)
        params.object_name("async config", name, acct)
        changing(who, acct)
        if not await plane().registry.delete_async_config(acct, name):
            raise ApiError(404, f"async config {name!r} not found in account {acct!r}")
        return Response(status_code=204)

    # -- operations -----------------------------------------------------------------------------

    def connected() -> bool:
        p = state.get("plane")
        return p is not None and bool(p.nc.is_connected)

    @app.get(
        "/v1/quarantine",
        tags=["ops"],
        responses={403: {"model": ErrorBody, "description": "Admins only"}},
    )
    async def list_quarantine(
        who: Who, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[dict[str, Any]]:
        """Records and queue messages that could not be decoded, newest last (admins only)."""
        if not who.admin:
            raise ApiError(403, "the quarantine is for admins")
        return await quarantine.list_entries(plane().rpc, limit)

    @app.get("/v1/limits", response_model=AccountLimits, tags=["accounts"])
    async def account_limits(who: Who, account: AccountParam = None) -> Response:
        """The caller's back-pressure limits and quotas, and the load of its queues."""
        acct = who.one_account(account)
        use = plane().registry.account_use(acct)
        loads: dict[str, QueueLoad] = {}
        for (owner, _), fn in list(plane().registry.functions.items()):
            if owner != acct or names.queue_label(fn) in loads:
                continue
            # Read again unless read within the depth's TTL: what was last read plus the
            # submissions counted since would still show tasks that ran meanwhile.
            with contextlib.suppress(*errors.UNAVAILABLE):
                await plane().depth.refresh(fn)
            queue, waiting, drain = plane().depth.known(fn)
            loads[queue] = QueueLoad(queue=queue, waiting=waiting, drainPerSecond=drain)
        records_held, record_bytes = state["records"].held(acct)
        running = IndexQuery([acct], phases=frozenset({TaskPhase.Running}))
        limits = AccountLimits(
            account=acct,
            maxBacklog=settings.backlog_limit(acct),
            throttleFrom=int(THROTTLE_FROM * settings.backlog_limit(acct)),
            maxRate=settings.rate_limit(acct),
            maxConcurrency=settings.concurrency_limit(acct),
            running=await indexer().query(acct, indexer().index.count, acct, running),
            maxChanges=settings.account_max_changes,
            changesBurst=settings.account_changes_burst,
            weight=settings.account_weights.get(acct, 1.0),
            fairness=settings.fairness,
            retentionSeconds=plane().store.retention.seconds(acct),
            functions=use.functions,
            maxFunctions=settings.account_max_functions,
            ownQueues=use.own_queues,
            maxOwnQueues=settings.account_max_own_queues,
            logStreams=log_streams.held(acct),
            maxLogStreams=settings.account_max_log_streams,
            records=records_held,
            recordBytes=record_bytes,
            maxRecordBytes=settings.account_max_record_bytes,
            maxLogBytes=settings.account_max_log_bytes,
            maxEventsBytes=settings.account_max_events_bytes,
            registeredBytes=plane().registry.account_bytes(acct),
            maxRegisteredBytes=settings.account_max_registered_bytes,
            queues=[loads[q] for q in sorted(loads)],
        )
        return _json(limits)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return api_docs.page(app.title, app.openapi_url or "/openapi.json")

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Readiness: 503 (with `Retry-After`) while NATS is unreachable or the task index is
        still catching up with the records (`gateway/indexing.py`)."""
        if not connected():
            raise errors.unavailable("not connected to NATS")
        if not indexer().loaded:
            raise errors.unavailable(indexer().progress())
        return {"status": "ok"}

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
    )
    async def prometheus_metrics(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """All series with the metrics token (what Prometheus scrapes with) or an admin token;
        an account's own and the platform's with its token; without one, the platform's.
        `?name[]=<series>` (repeatable, as in Prometheus' clients) keeps only those series."""
        # Read here rather than declared: a query array's items are strings whatever they look
        # like, which an OpenAPI fuzzer takes for a schema violation accepted.
        names = request.query_params.getlist("name[]") or None
        if is_scraper(settings.metrics_token, authorization):
            return Response(exposition(None, True, names), media_type=CONTENT_TYPE_LATEST)
        who = None if authorization is None else await principal(request, authorization)
        body = exposition(who.account if who else None, who is not None and who.admin, names)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    gate = FairGate(settings.fair_share(settings.gateway_fair_slots))
    submit_route = SubmitRoute(
        GatedRequests(app, gate, app.state.tokens),
        settings,
        app.state.tokens,
        plane,
        lambda: state["throttle"],
        lambda: state["records"],
        lambda: state["store"],
        gate,
    )
    return Guard(submit_route, settings.max_payload_bytes, connected)
