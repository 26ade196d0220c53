"""POST a destination record to a tenant's webhook, never to a network the platform denies.

A webhook URL is the one place a tenant makes the dispatcher open a connection of its choosing,
from inside the platform's network. The grammar (`grammar.WEBHOOK_PATTERN`) keeps the URL to one
well-formed request; this module keeps the connection off the denied networks
(`KUBETASK_WEBHOOK_DENIED_NETWORKS`; by default link-local addresses and the clouds' instance
metadata services, which answer credentials to anyone who asks). The address is checked after
name resolution, on the very addresses connected to, so a name that resolves (or re-resolves)
to a denied address is refused too; redirects are not followed, since a redirect could point
anywhere after the check. An answer other than 2xx, a redirect included, is a failed delivery.

A tenant also chooses how long its webhooks take, to resolve and to answer, so what delivery
shares is held per account. Names are resolved on threads of their own, at most
`LOOKUPS_PER_ACCOUNT` of an account's at once: they were resolved by the event loop's
`getaddrinfo`, on uvloop (the dispatcher's loop) libuv's thread pool, which every lookup in
the process shares, so one account's webhooks behind a slow name server held every account's
deliveries (a neighbour's waited 4.7 s behind 40 lookups of names this machine's resolver
does not know). An account has at most `DELIVERIES_PER_ACCOUNT` deliveries
in flight per dispatcher, and the connection pool has no limit of its own: its default of 100
connections, filled by one account's webhooks that never answer, made every other account's
deliveries wait until they timed out.

Its connections are marked (`SO_MARK`) so the host's firewall can tell them from the
dispatcher's own: a webhook at a warm instance's port on this host is refused
(`executors/instance_ports.py`), since it would invoke that instance, another account's too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from ..executors.instance_ports import WEBHOOK_MARK
from ..networks import Network, denied

LOOKUPS_PER_ACCOUNT = 2
DELIVERIES_PER_ACCOUNT = 32
# Threads resolving webhook hosts, shared by the accounts (each holding at most its share).
RESOLVER_THREADS = 16

# The account a delivery is for, as its host is resolved (aiohttp calls the resolver).
_account: ContextVar[str] = ContextVar("webhook_account", default="")


class WebhookRefused(Exception):
    """The webhook's address is in a denied network: no connection was made."""


class WebhookFailed(Exception):
    """The delivery failed, said without a byte of what the far end sent: the error reaches the
    task's log, and aiohttp's own quotes an answer that is not HTTP, so a webhook pointed at
    any port inside the platform's network read back that service's greeting (nats-server's
    INFO, with its version, id and key)."""


def _os_said(err: OSError) -> str:
    """This host's words for what went wrong, never the far end's."""
    return os.strerror(err.errno) if err.errno else type(err).__name__


def _failure(err: BaseException, timeout: float) -> WebhookFailed:
    if isinstance(err, TimeoutError):
        return WebhookFailed(f"no answer within {timeout:g} s")
    if isinstance(err, aiohttp.ClientConnectorError):
        return WebhookFailed(f"cannot connect: {_os_said(err.os_error)}")
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return WebhookFailed("the connection was closed before an answer")
    if isinstance(err, aiohttp.ClientOSError):
        why = f" ({os.strerror(err.errno)})" if err.errno else ""
        return WebhookFailed(f"the connection was closed before an answer{why}")
    if isinstance(err, aiohttp.ClientResponseError):
        return WebhookFailed("the answer was not well-formed HTTP")
    return WebhookFailed(f"delivery failed ({type(err).__name__})")


class _GuardedResolver(AbstractResolver):
    """Resolves on threads of its own, each account a few at a time, then drops the addresses in
    denied networks."""

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self._networks = networks
        self._threads = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="webhook-dns")
        self._turns: defaultdict[str, asyncio.Semaphore] = defaultdict(
            functools.partial(asyncio.Semaphore, LOOKUPS_PER_ACCOUNT)
        )

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._lookup(host, port, family)
        allowed = [r for r in found if denied(r["host"], self._networks) is None]
        if not allowed:
            raise WebhookRefused(f"{host} resolves only to addresses in denied networks")
        return allowed

    async def _lookup(
        self, host: str, port: int, family: socket.AddressFamily
    ) -> list[ResolveResult]:
        turn = self._turns[_account.get()]
        await turn.acquire()
        loop = asyncio.get_running_loop()

        def release(_: Future[list[ResolveResult]]) -> None:
            # When the thread is done, not when the delivery gives up waiting on it: a lookup
            # that never ends keeps its account's turn, not another account's thread.
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(turn.release)

        try:
            looking = self._threads.submit(_addresses, host, port, family)
        except BaseException:
            turn.release()
            raise
        looking.add_done_callback(release)
        return await asyncio.wrap_future(looking)

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


def _addresses(host: str, port: int, family: socket.AddressFamily) -> list[ResolveResult]:
    """What aiohttp's threaded resolver makes of `getaddrinfo`."""
    numeric = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    found: list[ResolveResult] = []
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
    for fam, _, proto, _, address in infos:
        if fam not in (socket.AF_INET, socket.AF_INET6):
            continue
        resolved, resolved_port = str(address[0]), int(address[1])
        if fam == socket.AF_INET6 and len(address) == 4 and address[3]:
            # A scoped (link-local) address: the scope goes into the host.
            resolved, service = socket.getnameinfo(
                address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
            )
            resolved_port = int(service)
        found.append(
            ResolveResult(
                hostname=host,
                host=resolved,
                port=resolved_port,
                family=fam,
                proto=proto,
                flags=numeric,
            )
        )
    return found


def marked_socket(addr: tuple[Any, ...]) -> socket.socket:
    """A socket for a webhook connection, marked where the dispatcher may mark (CAP_NET_ADMIN,
    which the firewall that looks at the mark needs as well)."""
    family, kind, proto = addr[:3]
    sock = socket.socket(family, kind, proto)
    with contextlib.suppress(PermissionError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, WEBHOOK_MARK)
    return sock


class Webhooks:
    def __init__(self, networks: tuple[Network, ...], timeout: float = 10) -> None:
        self._networks = networks
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._resolver = _GuardedResolver(networks)  # aiohttp closes only a resolver it made
        self._deliveries: defaultdict[str, asyncio.Semaphore] = defaultdict(
            functools.partial(asyncio.Semaphore, DELIVERIES_PER_ACCOUNT)
        )

    async def post(self, account: str, url: str, body: Any, headers: dict[str, str]) -> int:
        """The answer's status; raises WebhookRefused before connecting to a denied address,
        WebhookFailed when no answer came."""
        # An address written in the URL is connected to without resolution, so it is checked
        # here; names are checked by the resolver.
        host = urlsplit(url).hostname or ""
        net = denied(host, self._networks)
        if net is not None:
            raise WebhookRefused(f"{host} is in a denied network ({net})")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    resolver=self._resolver, limit=0, socket_factory=marked_socket
                ),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            )
        async with self._deliveries[account]:
            for_account = _account.set(account)
            try:
                async with self._session.post(
                    url, json=body, headers=headers, allow_redirects=False
                ) as resp:
                    return resp.status
            except (aiohttp.ClientError, TimeoutError) as err:
                raise _failure(err, self._timeout) from None
            finally:
                _account.reset(for_account)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._resolver.close()
