"""The FastAPI routes read their JSON bodies with `strict_json`, as the submit route does.

FastAPI parses a body with `json.loads`, which takes a key given twice (the last wins), `NaN`
and lone surrogates; a route class whose request parses strictly keeps one rule for every body.
A refusal is raised as the decode error FastAPI expects, so it is answered like any malformed
body (`errors.invalid_request`: 400, `malformed JSON body: ...`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from .. import strict_json


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = strict_json.loads(await self.body())
            except strict_json.NotJson as err:
                raise json.JSONDecodeError(str(err), "", 0) from None
        return self._json


class StrictJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict
