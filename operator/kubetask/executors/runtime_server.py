"""The dispatcher's end of the runtime sidecar (`runtime-sidecar/`): an HTTP endpoint that the
sidecars of the attempts this dispatcher runs in pods call back.

Each attempt gets a random token, given to its pod's sidecar only; the token is the whole of
that sidecar's credentials. With it, a sidecar can fetch its attempt's payload and report its
output and exit — nothing else, and nothing of any other attempt, task or account. Sidecars get
no NATS credentials at all, so an executor pod cannot reach a queue, a record or a log subject.

The sidecar's request bodies are the runtime's frames (`frames.py`). A request repeated after a
lost answer carries the same `X-Kubetask-Seq` and is applied once. An unknown token answers 404,
which tells a sidecar its attempt was abandoned (stopped, timed out, or its dispatcher
restarted).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket

from aiohttp import web

from .base import Invocation, Lines, Placement, Tail, encode_payload
from .frames import CODE, EXIT, RUNNING, STDERR, STDOUT, TERMINATED, BadFrames, FrameReader
from .pod_template import FUNCTION_CONTAINER
from .runtime_connections import PER_PEER, PeerLimit

# A Kubernetes object name (DNS-1123 subdomain): pods and nodes.
OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
MAX_BODY = 4 << 20
# The longest a frames request is held for its account's pace (`dispatch/log_pacing.py`): the
# sidecar gives up on an answer after 30 s and then takes the dispatcher for lost. What is not
# waited for here stays owed, and the next request waits for it. Meanwhile the sidecar holds at
# most 1 MiB more, then stops reading, and the function's writes wait.
PACED_AT_MOST = 10.0


class RuntimeAttempt:
    def __init__(self, inv: Invocation, token: str) -> None:
        loop = asyncio.get_running_loop()
        self.inv = inv
        self.token = token
        self.placed: asyncio.Future[Placement] = loop.create_future()
        self.running: asyncio.Future[None] = loop.create_future()  # the function's container
        self.exited: asyncio.Future[int] = loop.create_future()
        self.terminated = False  # the pod was told to stop (deleted, evicted) while it ran
        self.contact = loop.time()
        self.stdout = bytearray()
        self.too_big = False
        # Set once the result passes its limit: the attempt has failed, and its pod is ended.
        self.overflowed: asyncio.Future[None] = loop.create_future()
        self.stdout_tail = Tail()
        self.stderr_tail = Tail()
        self._lines = Lines()
        self.pod_name = OBJECT_NAME
        self._last_seq: str | None = None
        self._loop = loop

    def seen(self, seq: str | None) -> bool:
        """Whether this request was applied already (a retry after a lost answer)."""
        self.contact = self._loop.time()
        if seq is not None and seq == self._last_seq:
            return True
        self._last_seq = seq
        return False

    def apply(self, body: bytes) -> bytes:
        """Returns the log output (stderr) the body held, to be paced."""
        reader = FrameReader()
        frames = reader.feed(body)
        reader.finish()
        log = bytearray()
        for kind, data in frames:
            if kind == RUNNING:
                if not self.running.done():
                    self.running.set_result(None)
            elif kind == STDOUT:
                self.stdout_tail.add(data)
                if len(self.stdout) + len(data) <= self.inv.max_result_bytes:
                    self.stdout += data
                else:
                    self.too_big = True
                    if not self.overflowed.done():
                        self.overflowed.set_result(None)
            elif kind == STDERR:
                log += data
                self.stderr_tail.add(data)
                self._log(self._lines.feed(data))
            elif kind == TERMINATED:
                self.terminated = True
            elif kind == EXIT:
                if len(data) != CODE.size:
                    raise BadFrames("an exit frame holds 4 bytes")
                self._log(self._lines.rest())
                if not self.exited.done():
                    self.exited.set_result(CODE.unpack(data)[0])
            else:
                raise BadFrames(f"unknown frame kind {kind}")
        return bytes(log)

    def _log(self, lines: list[str]) -> None:
        for line in lines:
            self.inv.log("stderr", line)


class RuntimeServer:
    def __init__(self, host: str, port: int, per_peer: int = PER_PEER) -> None:
        self.host = host
        self.port = port
        self.per_peer = per_peer
        self._attempts: dict[str, RuntimeAttempt] = {}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._runner is not None:
                return
            app = web.Application(client_max_size=MAX_BODY)
            app.router.add_post("/v1/run/start", self._start)
            app.router.add_post("/v1/run/frames", self._frames)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            sock = socket.create_server((self.host, self.port), reuse_port=False)
            self.port = sock.getsockname()[1]  # the one chosen, when asked for any
            assert runner.server is not None
            limit = PeerLimit(runner.server, self.per_peer)  # `runtime_connections.py`
            self._server = await asyncio.get_running_loop().create_server(limit, sock=sock)
            self._runner = runner

    def open(self, inv: Invocation, job: str | None = None) -> RuntimeAttempt:
        """An attempt whose sidecar may call in; with `job`, its pod must be one that Job
        makes (the Job's name and a five-character suffix)."""
        attempt = RuntimeAttempt(inv, secrets.token_urlsafe(32))
        if job is not None:
            attempt.pod_name = re.compile(re.escape(job) + r"-[a-z0-9]{5}")
        self._attempts[attempt.token] = attempt
        return attempt

    def forget(self, attempt: RuntimeAttempt) -> None:
        self._attempts.pop(attempt.token, None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _attempt(self, request: web.Request) -> RuntimeAttempt:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        attempt = self._attempts.get(token) if scheme == "Bearer" else None
        if attempt is None:
            raise web.HTTPNotFound(text="no such attempt")
        return attempt

    async def _start(self, request: web.Request) -> web.Response:
        attempt = self._attempt(request)
        attempt.seen(request.headers.get("X-Kubetask-Seq"))
        try:
            where = json.loads(await request.read())
            pod, namespace = str(where["pod"]), str(where["namespace"])
            node = str(where.get("node") or "") or None
        except (ValueError, KeyError, TypeError) as err:
            raise web.HTTPBadRequest(text=f"bad placement: {err}") from None
        # What a sidecar says lands on the task's record, and `kubetask login` execs into it:
        # only its own account's namespace, and only a pod its Job could have made.
        if namespace != attempt.inv.account or not attempt.pod_name.fullmatch(pod):
            raise web.HTTPBadRequest(text="not this attempt's pod")
        if node is not None and not OBJECT_NAME.fullmatch(node):
            raise web.HTTPBadRequest(text="not a node name")
        if not attempt.placed.done():
            attempt.placed.set_result(Placement(pod, namespace, node, FUNCTION_CONTAINER))
        return web.Response(body=encode_payload(attempt.inv.payload))

    async def _frames(self, request: web.Request) -> web.Response:
        attempt = self._attempt(request)
        body = await request.read()
        if not attempt.seen(request.headers.get("X-Kubetask-Seq")):
            try:
                log = attempt.apply(body)
            except BadFrames as err:
                raise web.HTTPBadRequest(text=str(err)) from None
            if log and attempt.inv.pace is not None:  # the pod's next frames wait for this answer
                await asyncio.sleep(min(attempt.inv.pace(log), PACED_AT_MOST))
        return web.Response(status=204)
