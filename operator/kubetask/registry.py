"""Registered functions and async configs, stored in KV and mirrored in every process.

An `auto` function's queue assignment (`queue_routes.py`) is kept in a bucket of its own, so
re-registering a function never undoes it; the mirror carries it in the function's status, and
a change of assignment reaches listeners as a change of the function.

The gateway validates submissions against the mirror (never a 202 for a function that cannot
run); dispatchers start and stop consumers as functions come and go, and pick up AsyncConfig
changes without a restart because they read the mirror on every task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from . import names, quarantine, quotas
from .models import (
    DEFAULT_ASYNC_CONFIG,
    AsyncConfig,
    AsyncConfigSpec,
    QueueAssignment,
    TaskFunction,
    TaskFunctionStatus,
)
from .watch import BucketMirror

M = TypeVar("M", TaskFunction, AsyncConfig, QueueAssignment)
FunctionListener = Callable[[str, str, TaskFunction | None], None]


class ConfigConflict(Exception):
    pass


@dataclass
class AccountUse:
    functions: int = 0
    own_queues: int = 0  # streams of its functions' own: dedicated ones and partitions


class Registry:
    def __init__(self, js: JetStreamContext, limits: quotas.Limits) -> None:
        self.js = js
        self.limits = limits
        # Bytes stored per (kind, account, name) and per account: every process keeps every
        # account's registrations in memory, so what one account may store is bounded.
        self._sizes: dict[tuple[str, str, str], int] = {}
        self._account_bytes: dict[str, int] = {}
        self.functions: dict[tuple[str, str], TaskFunction] = {}
        # As registered (no status); `functions` holds them with their queue assignment.
        self._registered: dict[tuple[str, str], TaskFunction] = {}
        self.routes: dict[tuple[str, str], tuple[QueueAssignment, int]] = {}
        self.configs: dict[tuple[str, str], AsyncConfig] = {}
        self._by_function: dict[tuple[str, str], AsyncConfigSpec] = {}
        self._listeners: list[FunctionListener] = []
        self._mirrors: list[BucketMirror] = []
        # Bumped on every change of a function as it runs: views derived from all functions
        # (periodic passes over ten thousand of them) are recomputed only then.
        self.generation = 0
        self._views_at = -1
        self._by_stream: dict[str, list[tuple[TaskFunction, names.Queue]]] = {}
        self._partitioned: list[TaskFunction] = []
        self._by_account: dict[str, AccountUse] = {}

    async def start(self) -> None:
        self._fn_kv = await self.js.key_value(names.FUNCTIONS_BUCKET)
        self._cfg_kv = await self.js.key_value(names.ASYNC_CONFIGS_BUCKET)
        self._route_kv = await self.js.key_value(names.ROUTES_BUCKET)
        self._mirrors = [
            BucketMirror(self._route_kv, self._apply_route),
            BucketMirror(self._fn_kv, self._apply_function),
            BucketMirror(self._cfg_kv, self._apply_config),
        ]
        for mirror in self._mirrors:
            await mirror.start()

    async def stop(self) -> None:
        for mirror in self._mirrors:
            await mirror.stop()

    async def caught_up(self) -> None:
        for mirror in self._mirrors:
            await mirror.caught_up()

    def on_function_change(self, listener: FunctionListener) -> None:
        self._listeners.append(listener)

    def _poisoned(self, key: str, value: bytes, revision: int, err: Exception) -> None:
        where = f"registry/{key}"
        poison = quarantine.Poison(
            "registry", where, value, quarantine.describe(err), f"registry.{key}.{revision}"
        )
        quarantine.keep_later(self.js, poison)

    def _decode(self, model: type[M], key: str, value: bytes | None, revision: int) -> M | None:
        """The stored object, or None when deleted — or undecodable, which is quarantined and
        treated as absent rather than stopping the mirror (and every later change with it)."""
        if value is None:
            return None
        try:
            return model.model_validate_json(value)
        except ValueError as err:
            self._poisoned(key, value, revision, err)
            return None

    def _count(self, kind: str, account: str, name: str, value: bytes | None) -> None:
        size = len(value or b"")
        before = self._sizes.pop((kind, account, name), 0)
        if size:
            self._sizes[(kind, account, name)] = size
        self._account_bytes[account] = self._account_bytes.get(account, 0) + size - before

    def account_bytes(self, account: str) -> int:
        """Bytes `account`'s functions and AsyncConfigs take as stored."""
        return self._account_bytes.get(account, 0)

    def object_bytes(self, kind: str, account: str, name: str) -> int:
        """Bytes one object ("function" or "config") takes as stored; 0 if there is none."""
        return self._sizes.get((kind, account, name), 0)

    def config_count(self, account: str) -> int:
        return sum(acct == account for acct, _ in self.configs)

    def _apply_function(self, key: str, value: bytes | None, revision: int) -> None:
        account, name = names.split_key(key)
        self._count("function", account, name, value)
        fn = self._decode(TaskFunction, key, value, revision)
        if fn is None:
            self._registered.pop((account, name), None)
        else:
            self._registered[(account, name)] = fn
        self._publish(account, name)

    def _apply_route(self, key: str, value: bytes | None, revision: int) -> None:
        account, name = names.split_key(key)
        route = self._decode(QueueAssignment, key, value, revision)
        if route is None:
            self.routes.pop((account, name), None)
        else:
            self.routes[(account, name)] = (route, revision)
        if (account, name) in self._registered:
            self._publish(account, name)

    def _publish(self, account: str, name: str) -> None:
        registered = self._registered.get((account, name))
        fn = None if registered is None else self.with_route(registered)
        if fn is None:
            self.functions.pop((account, name), None)
        else:
            self.functions[(account, name)] = fn
        self.generation += 1
        for listener in self._listeners:
            listener(account, name, fn)

    def _views(self) -> None:
        """Views derived from every function, recomputed only after a change."""
        if self._views_at == self.generation:
            return
        grouped: dict[str, list[tuple[TaskFunction, names.Queue]]] = {}
        accounts: dict[str, AccountUse] = {}
        for fn in self.functions.values():
            use = accounts.setdefault(fn.account, AccountUse())
            use.functions += 1
            for queue in names.queues_of(fn):
                grouped.setdefault(queue.stream, []).append((fn, queue))
                use.own_queues += not queue.shared
        self._by_stream = grouped
        self._by_account = accounts
        self._partitioned = [fn for fn in self.functions.values() if fn.spec.partitions > 1]
        self._views_at = self.generation

    def by_stream(self) -> dict[str, list[tuple[TaskFunction, names.Queue]]]:
        """Every function's queues, grouped by the stream holding them."""
        self._views()
        return self._by_stream

    def account_use(self, account: str) -> AccountUse:
        """How many functions `account` has registered, and streams of their own they hold."""
        self._views()
        return self._by_account.get(account, AccountUse())

    def partitioned(self) -> list[TaskFunction]:
        """The functions split into partitions (the ones dispatchers lease)."""
        self._views()
        return self._partitioned

    def with_route(self, fn: TaskFunction) -> TaskFunction:
        """`fn` as it runs now: with its queue assignment, if the platform made one."""
        route = self.routes.get((fn.account, fn.name))
        if route is None or not names.routed(fn.spec):
            return fn if fn.status is None else fn.model_copy(update={"status": None})
        return fn.model_copy(update={"status": TaskFunctionStatus(queueAssignment=route[0])})

    async def assign_queue(self, account: str, name: str, assignment: QueueAssignment) -> bool:
        """Record an assignment unless one exists (another gateway was first): whether it did."""
        data = assignment.model_dump_json().encode()
        try:
            await self._route_kv.create(names.object_key(account, name), data)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def reassign_queue(
        self, account: str, name: str, assignment: QueueAssignment, revision: int
    ) -> bool:
        """Replace the assignment read at `revision`, unless it changed meanwhile: whether it
        did."""
        data = assignment.model_dump_json().encode()
        try:
            await self._route_kv.update(names.object_key(account, name), data, last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def unassign_queue(self, account: str, name: str, revision: int) -> bool:
        """Drop the assignment read at `revision`, unless it changed meanwhile: whether it did."""
        try:
            await self._route_kv.delete(names.object_key(account, name), last=revision)
        except APIError as err:  # nats-py raises the server's error as is for a delete
            if err.err_code in (10071, 10164):  # wrong last sequence
                return False
            raise
        return True

    def _apply_config(self, key: str, value: bytes | None, revision: int) -> None:
        account, name = names.split_key(key)
        self._count("config", account, name, value)
        cfg = self._decode(AsyncConfig, key, value, revision)
        if cfg is None:
            self.configs.pop((account, name), None)
        else:
            self.configs[(account, name)] = cfg
        # Looked up for every task, so kept as an index by function.
        self._by_function = {(a, c.spec.function): c.spec for (a, _), c in self.configs.items()}

    def function(self, account: str, name: str) -> TaskFunction | None:
        return self.functions.get((account, name))

    def async_config(self, account: str, function: str) -> AsyncConfigSpec:
        found = self._by_function.get((account, function))
        return found if found is not None else DEFAULT_ASYNC_CONFIG

    @staticmethod
    def encode(obj: TaskFunction | AsyncConfig) -> bytes:
        """An object as stored: without its status, which is the platform's to report."""
        return obj.model_copy(update={"status": None}).model_dump_json().encode()

    async def put_function(self, fn: TaskFunction) -> None:
        await self._fn_kv.put(names.object_key(fn.account, fn.name), self.encode(fn))

    async def delete_function(self, account: str, name: str) -> bool:
        """Unregister a function, and forget where the platform had put its queue."""
        await self._delete(self._route_kv, account, name)
        return await self._delete(self._fn_kv, account, name)

    async def put_async_config(self, cfg: AsyncConfig) -> None:
        for (acct, name), other in self.configs.items():
            if (
                acct == cfg.account
                and name != cfg.metadata.name
                and other.spec.function == cfg.spec.function
            ):
                raise ConfigConflict(
                    f"function {cfg.spec.function!r} already has AsyncConfig {name!r}; "
                    "update that one or delete it first"
                )
        data = self.encode(cfg)
        quotas.check_config(self, cfg.account, cfg.metadata.name, data)
        await self._cfg_kv.put(names.object_key(cfg.account, cfg.metadata.name), data)

    async def delete_async_config(self, account: str, name: str) -> bool:
        return await self._delete(self._cfg_kv, account, name)

    @staticmethod
    async def _delete(kv: KeyValue, account: str, name: str) -> bool:
        key = names.object_key(account, name)
        try:
            await kv.get(key)
        except KeyNotFoundError:
            return False
        await kv.delete(key)
        return True
