"""POST a destination record to a tenant's webhook, never to a network the platform denies.

A webhook URL is the one place a tenant makes the dispatcher open a connection of its choosing,
from inside the platform's network. The grammar (`grammar.WEBHOOK_PATTERN`) keeps the URL to one
well-formed request; this module keeps the connection off the denied networks
(`KUBETASK_WEBHOOK_DENIED_NETWORKS`; by default link-local addresses and the clouds' instance
metadata services, which answer credentials to anyone who asks). The address is checked after
name resolution, on the very addresses connected to, so a name that resolves (or re-resolves)
to a denied address is refused too; redirects are not followed, since a redirect could point
anywhere after the check. An answer other than 2xx, a redirect included, is a failed delivery.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from ..networks import Network, denied


class WebhookRefused(Exception):
    """The webhook's address is in a denied network: no connection was made."""


class _GuardedResolver(AbstractResolver):
    """Resolves as usual, then drops the addresses in denied networks."""

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self._inner = DefaultResolver()
        self._networks = networks

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if denied(r["host"], self._networks) is None]
        if not allowed:
            raise WebhookRefused(f"{host} resolves only to addresses in denied networks")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class Webhooks:
    def __init__(self, networks: tuple[Network, ...], timeout: float = 10) -> None:
        self._networks = networks
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: Any, headers: dict[str, str]) -> int:
        """The answer's status; raises WebhookRefused before connecting to a denied address."""
        # An address written in the URL is connected to without resolution, so it is checked
        # here; names are checked by the resolver.
        host = urlsplit(url).hostname or ""
        net = denied(host, self._networks)
        if net is not None:
            raise WebhookRefused(f"{host} is in a denied network ({net})")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=_GuardedResolver(self._networks)),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            )
        async with self._session.post(
            url, json=body, headers=headers, allow_redirects=False
        ) as resp:
            return resp.status

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
