"""The no-op warm-server function the throughput benchmark submits to: answers every invocation
with a small JSON result, as fast as aiohttp allows."""

import os

from aiohttp import web


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def invoke(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True})


app = web.Application()
app.router.add_get("/healthz", healthz)
app.router.add_post("/invoke", invoke)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None, access_log=None)
