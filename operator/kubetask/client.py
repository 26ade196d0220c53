"""A small synchronous HTTP client for the API, used by the CLI (and handy in scripts)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx


def segment(value: str) -> str:
    """One path segment, whatever the user typed: `/`, `?`, `%` and dots cannot change the
    route (the server answers 404 for a name outside its grammar)."""
    return quote(value, safe="").replace(".", "%2E")


# How often a change past the account's change rate is asked again, and the longest wait taken.
CHANGE_RETRIES = 10
CHANGE_WAIT_MOST = 60


class ApiFailure(Exception):
    def __init__(self, status: int, body: Any) -> None:
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            message = body["error"]
        else:  # every answer of the API's has the error body: this is some other server
            message = "this is not the kubetask API (its errors have a JSON body with 'error')"
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


def _checked_url(url: str) -> httpx.URL:
    """The API's address, refused here with what is wrong rather than as a traceback from
    deep in httpx, or as a connection refused on a port that cannot exist."""
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as err:
        raise ValueError(f"{url!r} is not the API's URL ({err})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} is not the API's URL: give http(s)://host[:port]")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{url!r} is not the API's URL: its port is not 1 to 65535")
    return parsed


def _checked_token(token: str) -> str:
    """A token goes into a header, which holds visible ASCII only; the token itself is never
    echoed (it is a secret)."""
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ValueError("the token holds characters no kubetask token has (spaces, non-ASCII)")
    return token


def _answer(resp: httpx.Response) -> Any:
    """The body of a success; an ApiFailure for an error, or for an answer that is not JSON
    (another server at that address), which the commands could not read."""
    if resp.status_code == 204:
        return None
    try:
        body = resp.json()
    except ValueError:
        raise ApiFailure(resp.status_code, resp.text) from None
    if resp.status_code >= 400:
        raise ApiFailure(resp.status_code, body)
    return body


class Client:
    def __init__(
        self,
        url: str,
        token: str,
        account: str | None = None,
        timeout: float = 30,
        notice: Callable[[str], None] = lambda _: None,
    ) -> None:
        """`notice`: told what the client does that the caller did not ask for (waiting)."""
        self.account = account
        self.notice = notice
        self.http = httpx.Client(
            base_url=str(_checked_url(url.rstrip("/"))),
            headers={"Authorization": f"Bearer {_checked_token(token)}"},
            timeout=timeout,
        )

    def _params(self, **extra: Any) -> dict[str, Any]:
        params = {k: v for k, v in extra.items() if v is not None and v != ""}
        if self.account:
            params["account"] = self.account
        return params

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return _answer(self.http.request(method, path, **kwargs))

    def _change(self, method: str, path: str, **kwargs: Any) -> Any:
        """A change of a function or AsyncConfig: where the account is past its change rate
        (`429`, nothing changed), asked again after the `Retry-After` the API gave, as
        `kubectl apply` does, so a manifest longer than the burst is applied whole."""
        for _ in range(CHANGE_RETRIES):
            resp = self.http.request(method, path, **kwargs)
            wait = resp.headers.get("Retry-After", "")
            if resp.status_code != 429 or not wait.isdigit() or int(wait) > CHANGE_WAIT_MOST:
                break
            self.notice(f"throttled: {method} {path} again in {wait}s")
            time.sleep(int(wait))
        return _answer(resp)

    def submit(self, function: str, payload: Any = None, task_id: str | None = None) -> Any:
        body: dict[str, Any] = {"function": function, "payload": payload}
        if task_id is not None:  # an empty one is the API's to refuse, not to replace
            body["id"] = task_id
        return self._call("POST", "/v1/tasks", json=body, params=self._params())

    def get(self, task_id: str) -> Any:
        return self._call("GET", f"/v1/tasks/{segment(task_id)}", params=self._params())

    def list(self, **filters: Any) -> Any:
        return self._call("GET", "/v1/tasks", params=self._params(**filters))

    def limits(self) -> Any:
        return self._call("GET", "/v1/limits", params=self._params())

    def events(self, task_id: str) -> Any:
        return self._call("GET", f"/v1/tasks/{segment(task_id)}/events", params=self._params())

    def action(self, task_id: str, action: str) -> Any:
        if action == "delete":
            return self._call("DELETE", f"/v1/tasks/{segment(task_id)}", params=self._params())
        return self._call("POST", f"/v1/tasks/{segment(task_id)}/{action}", params=self._params())

    def logs(self, task_id: str, follow: bool = False) -> Iterator[dict[str, Any]]:
        params = self._params(follow="true" if follow else None)
        with self.http.stream(
            "GET", f"/v1/tasks/{segment(task_id)}/logs", params=params, timeout=None
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                _answer(resp)
            for line in resp.iter_lines():
                if line:
                    yield json.loads(line)

    def apply(self, obj: dict[str, Any]) -> Any:
        path, params = self.object_path(obj, "apply")
        return self._change("PUT", path, json=obj, params=params)

    def delete(self, path: str, params: dict[str, str]) -> None:
        """What `object_path` named, as `kubectl delete -f` deletes what a manifest names."""
        self._change("DELETE", path, params=params)

    def object_path(self, obj: dict[str, Any], verb: str) -> tuple[str, dict[str, str]]:
        kind = obj.get("kind")
        paths = {"TaskFunction": "functions", "AsyncConfig": "asyncconfigs"}
        if kind not in paths:
            raise ValueError(f"cannot {verb} kind {kind!r}; expected TaskFunction or AsyncConfig")
        meta = obj.setdefault("metadata", {})
        if self.account and "namespace" not in meta:
            meta["namespace"] = self.account
        name = meta.get("name")
        if not name:
            raise ValueError(f"{kind} without metadata.name")
        params = self._params(account=meta.get("namespace"))
        return f"/v1/{paths[kind]}/{segment(str(name))}", params

    def functions(self) -> Any:
        return self._every_page("/v1/functions")

    def _every_page(self, path: str) -> Any:
        """Every object of a paginated listing, following its `Next-Cursor` headers."""
        found = []
        cursor = None
        while True:
            resp = self.http.get(path, params=self._params(cursor=cursor, limit=1000))
            found += _answer(resp)
            cursor = resp.headers.get("Next-Cursor")
            if not cursor:
                return found

    def delete_function(self, name: str) -> Any:
        return self._change("DELETE", f"/v1/functions/{segment(name)}", params=self._params())
