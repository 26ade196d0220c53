"""The dispatcher process: connect, dispatch until SIGTERM/SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

from .. import metrics
from ..plane import DataPlane
from ..runtime import quiet_gc
from ..settings import Settings
from .dispatcher import Dispatcher


async def serve(settings: Settings, drain_timeout: float, own_ports: tuple[int, ...]) -> None:
    plane = await DataPlane.connect(settings, "kubetask-dispatcher")
    dispatcher = Dispatcher(plane, own_ports=own_ports)
    await dispatcher.start()
    quiet_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("kubetask.dispatcher").info("dispatcher %s started", dispatcher.id)
    await stop.wait()
    await dispatcher.close(drain_timeout)
    with contextlib.suppress(Exception):
        await plane.close()


def run(
    settings: Settings,
    metrics_port: int | None,
    drain_timeout: float,
    metrics_host: str = "127.0.0.1",
    metrics_socket: socket.socket | None = None,
) -> None:
    """With `metrics_socket` (a listening socket held by `kubetask dev`), metrics are served
    there, on `metrics_port`."""
    if metrics_port:
        metrics.serve(metrics_port, metrics_host, settings.metrics_token, metrics_socket)
    import uvloop

    uvloop.run(serve(settings, drain_timeout, (metrics_port,) if metrics_port else ()))
