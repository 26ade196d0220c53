"""The `kubetask` command: run the platform (dev, gateway, dispatcher) and talk to its API.

Client commands find the API and token in KUBETASK_URL / KUBETASK_TOKEN, else in the
`client.json` that `kubetask dev` writes into its data directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO, cast

import httpx

from . import strict_json, text_files
from .client import ApiFailure, Client
from .dispatch import destination_chains
from .sizes import in_binary_units
from .terminal import InertStream

DEFAULT_DATA_DIR = Path(".kubetask-data")


def _client(args: argparse.Namespace) -> Client:
    from .dev import load_client_config

    url = args.url or os.environ.get("KUBETASK_URL")
    token = args.token or os.environ.get("KUBETASK_TOKEN")
    if not (url and token):
        cfg = load_client_config(Path(args.data_dir)) or {}
        url = url or cfg.get("url")
        token = token or (cfg.get("adminToken") if args.admin else cfg.get("token"))
    if not (url and token):
        sys.exit(
            "error: no API to talk to: start `kubetask dev` (here, or say its --data-dir),"
            " or set KUBETASK_URL and KUBETASK_TOKEN"
        )
    return Client(
        url, token, account=args.account, notice=lambda said: print(said, file=sys.stderr)
    )


def _ago(stamp: str | None) -> str:
    if not stamp:
        return "-"
    then = datetime.fromisoformat(stamp)
    return _span((datetime.now(then.tzinfo) - then).total_seconds())


def _span(seconds: float, exact: bool = False) -> str:
    """In its largest unit (those `--started-after 2h` takes): whole (`3h` for 3 h 40 min), or
    `exact` (`1.5d`)."""
    largest = sorted(_AGO.items(), key=lambda unit: unit[1], reverse=True)
    unit, size = next(((u, n) for u, n in largest if seconds >= n), ("s", 1))
    return f"{seconds / size:g}{unit}" if exact else f"{int(seconds // size)}{unit}"


def _duration(task: dict[str, Any]) -> str:
    ts = task["status"]["timestamps"]
    if not ts.get("started") or not ts.get("finished"):
        return "-"
    secs = (
        datetime.fromisoformat(ts["finished"]) - datetime.fromisoformat(ts["started"])
    ).total_seconds()
    return f"{secs * 1000:.0f}ms" if secs < 1 else f"{secs:.1f}s"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)).rstrip()
        for r in [headers, *rows]
    ]
    return "\n".join(lines)


def _print_tasks(tasks: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        print(json.dumps(tasks, indent=2))
        return
    rows = [
        [
            t["metadata"]["name"],
            t["metadata"]["namespace"],
            t["spec"]["function"],
            t["status"]["phase"],
            str(t["status"]["attempts"]),
            _ago(t["status"]["timestamps"].get("submitted")),
            _duration(t),
            (t["status"].get("error") or "").split("\n", 1)[0][:60],
        ]
        for t in tasks
    ]
    print(
        _table(rows, ["ID", "ACCOUNT", "FUNCTION", "PHASE", "ATTEMPTS", "AGE", "DURATION", "ERROR"])
    )


def _payload(args: argparse.Namespace) -> Any:
    where = ""
    if args.payload_file:
        source = text_files.named(args.payload_file)
        where = f" in {source}"
        try:
            text = text_files.read(args.payload_file)
        except UnicodeDecodeError:
            sys.exit(f"error: the payload{where} is not text (UTF-8); a payload is JSON")
        except text_files.TooLarge as err:
            sys.exit(f"error: the payload{where} is too large: {err}")
        except OSError as err:
            sys.exit(f"error: cannot read the payload from {source}: {err.strerror or err}")
    elif args.payload is not None:
        text = args.payload
    else:
        return None

    try:
        # The gateway's rules, so the payload sent is the one written (a key given twice would
        # otherwise be dropped here, silently) and a refusal comes before anything is sent.
        payload = strict_json.loads(text)
        strict_json.check_finite(payload)
        return payload
    except ValueError as err:
        sys.exit(f"error: the payload{where} is not JSON ({err}); quote a plain string: '\"text\"'")


def cmd_submit(args: argparse.Namespace) -> None:
    task = _client(args).submit(args.function, _payload(args), args.id)
    if args.output == "json":
        print(json.dumps(task, indent=2))
    else:
        print(task["metadata"]["name"])


def cmd_get(args: argparse.Namespace) -> None:
    task = _client(args).get(args.id)
    if args.output == "json":
        print(json.dumps(task, indent=2))
        return
    _print_tasks([task], "table")
    _print_details(task)


def _print_details(task: dict[str, Any]) -> None:
    status = task["status"]
    print("\nstages:")
    for stage, stamp in status["timestamps"].items():
        print(f"  {stage:<10} {stamp or '-'}")
    if status.get("nextAttemptAt"):
        print(f"next attempt at {status['nextAttemptAt']}")
    if status.get("waiting"):
        w = status["waiting"]
        part = f", partition {w['partition']}" if w.get("partition") is not None else ""
        place = f", position {w['position']}" if w.get("position") else ""
        print(f"waiting in {w['queue']}{part}{place}: {w['reason']}")
    if status.get("executor"):
        print(f"executor: {_executor(status['executor'])}")
    notes = task["metadata"].get("annotations") or {}
    if notes.get(destination_chains.SOURCE):
        print(
            f"record of: task {notes[destination_chains.SOURCE]}, delivered to this function"
            f" (destination {notes.get(destination_chains.DEPTH, '?')} of its chain)"
        )
    if status.get("result") is not None:
        print(f"result: {json.dumps(status['result'])[:2000]}")
    if status.get("error"):
        code = status.get("exitCode")
        how = "" if code is None else f" (exit code {code})"
        if code is not None and code < 0:  # a local process's end by a signal, as Popen says it
            # Imported only here: the executors package loads the Kubernetes client (0.4 s).
            from .executors.base import how_it_ended

            how = f" ({how_it_ended(code)})"
        print(f"error{how}:\n{status['error']}")


def _executor(ex: dict[str, Any]) -> str:
    where = [f"pod {ex.get('namespace')}/{ex['pod']}"] if ex.get("pod") else [ex.get("host")]
    if ex.get("node"):
        where.append(f"on node {ex['node']}")
    parts = [ex["backend"], ex.get("instance"), *where, f"(dispatcher {ex['dispatcher']})"]
    return " ".join(p for p in parts if p)


def cmd_login(args: argparse.Namespace) -> None:
    """A shell, or a command, in the container running a task, found by its id: `kubectl exec`
    into the pod its attempt runs in (recorded on the attempt), so nobody has to work out which
    pod that is."""
    status = _client(args).get(args.id)["status"]
    ex = status.get("executor") or {}
    if status["phase"] != "Running":
        sys.exit(f"error: task {args.id} is {status['phase']}: only a running task has a pod")
    if not ex.get("pod"):
        sys.exit(
            f"error: task {args.id} runs as a local process on {ex.get('host')}, not in a "
            "Kubernetes pod: there is nothing to log into"
        )
    command = args.command
    argv = [args.kubectl, "exec", "--namespace", ex["namespace"], ex["pod"]]
    if ex.get("container"):
        argv += ["--container", ex["container"]]
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    if terminal or not command:
        argv.append("--stdin")
    if terminal:
        argv.append("--tty")
    argv += ["--", *(command or ["sh"])]
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        sys.exit(f"error: cannot run {args.kubectl}: {err}")


def cmd_describe(args: argparse.Namespace) -> None:
    """Everything about one task in one place: `get`, then what happened to it (the audit
    trail, attempt by attempt) and the last lines it logged."""
    client = _client(args)
    task = client.get(args.id)
    trail = client.events(args.id)
    lines = list(deque(client.logs(args.id), maxlen=args.tail))
    if args.output == "json":
        print(json.dumps({"task": task, "events": trail, "logs": lines}, indent=2))
        return
    meta, spec, status = task["metadata"], task["spec"], task["status"]
    print(f"task {meta['name']} in account {meta['namespace']}, function {spec['function']}")
    print(f"phase {status['phase']}, {status['attempts']} attempt(s)")
    _print_details(task)
    print("\nevents:")
    rows = [
        [
            e["time"],
            e.get("phase") or "deleted",
            str(e.get("attempts", 0)),
            _executor(e["executor"]) if e.get("executor") else "-",
            (e.get("error") or "")[:60],
        ]
        for e in trail
    ]
    print(_indent(_table(rows, ["TIME", "PHASE", "ATTEMPTS", "EXECUTOR", "ERROR"])))
    print(f"\nlogs (last {args.tail} lines):" if lines else "\nlogs: none")
    for rec in lines:
        print(f"  {rec['ts']} [{rec['attempt']} {rec['stream']}] {rec['line']}")


def _bounded(kind: type[float], low: float, high: float, what: str) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` in [low, high], or a usage error naming the range."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # NaN is in no range
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} ({low} to {high})")
        return value

    return parse


def _whole(low: int, high: int, what: str) -> Callable[[str], Any]:
    return _bounded(int, low, high, what)


def _seconds(low: float, high: float) -> Callable[[str], Any]:
    return _bounded(float, low, high, "a time in seconds")


# The most tasks the API returns on one page (`GET /v1/tasks?limit=`).
PAGE_MOST = 1000
port_number = _whole(0, 65535, "a port")
line_count = _whole(0, 1_000_000, "a number of lines")
descriptor = _whole(0, 1 << 20, "a file descriptor")


_AGO = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def point_in_time(text: str) -> str:
    """A `--started-*` bound as the API takes it (RFC 3339, UTC) from what a person types: a
    full time with a zone, a date or a time without one (taken as UTC, as the API's times
    are), or a span ago (`90s`, `15m`, `2h`, `7d`)."""
    text = text.strip()
    unit = _AGO.get(text[-1:])
    try:
        if unit is not None and text[:-1].isascii() and text[:-1].isdigit():
            moment = datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * unit)
        else:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not a time: give 2026-01-31, 2026-01-31T08:00 (UTC), "
                    "2026-01-31T08:00:00+01:00, or a span ago like 15m, 2h or 7d"
                ) from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time between the years 1 and 9999 (UTC)"
        ) from None
    return moment.isoformat().replace("+00:00", "Z")


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def cmd_list(args: argparse.Namespace) -> None:
    client = _client(args)
    filters = {
        "function": args.function,
        "status": args.status,
        "idPrefix": args.prefix,
        "startedAfter": args.started_after,
        "startedBefore": args.started_before,
    }
    items: list[dict[str, Any]] = []
    cursor = args.cursor
    # Pages end at the API's page size and before a page of large tasks would pass
    # KUBETASK_PAGE_MAX_BYTES, so --limit (the tasks wanted) takes as many pages as it needs.
    while True:
        filters["limit"] = PAGE_MOST if args.all else min(PAGE_MOST, args.limit - len(items))
        page = client.list(**filters, cursor=cursor)
        items.extend(page["items"])
        cursor = page.get("cursor")
        if not cursor or not (args.all or len(items) < args.limit):
            break
    _print_tasks(items, args.output)
    if cursor:  # on stderr, so that -o json stays one document
        print(f"(more: --all, or pass --cursor {cursor})", file=sys.stderr)


def cmd_action(args: argparse.Namespace) -> None:
    task = _client(args).action(args.id, args.command)
    if args.output == "json" and task is not None:
        print(json.dumps(task, indent=2))
    else:
        phase = task["status"]["phase"] if task else "deleted"
        print(f"{args.id}: {phase}")


def cmd_logs(args: argparse.Namespace) -> None:
    for rec in _client(args).logs(args.id, follow=args.follow):
        if args.output == "json":
            print(json.dumps(rec), flush=True)
        else:
            print(f"{rec['ts']} [{rec['attempt']} {rec['stream']}] {rec['line']}", flush=True)


def _delete_functions(client: Client, args: argparse.Namespace) -> None:
    """A function by name, or every object a manifest names: its AsyncConfigs first, which
    would otherwise outlive their functions. One not found is said, and the others still go."""
    from .manifests import read_objects

    if (args.name is None) == (args.file is None):
        sys.exit("error: name a function, or give a manifest with -f (not both)")
    if args.name is not None:
        client.delete_function(args.name)
        print(f"taskfunction/{args.name} deleted")
        return
    docs = read_objects(Path(args.file))
    failed = False
    for doc in sorted(docs, key=lambda d: d.get("kind") != "AsyncConfig"):
        path, params = client.object_path(doc, "delete")
        what = f"{str(doc['kind']).lower()}/{path.rsplit('/', 1)[1]}"
        try:
            client.delete(path, params)
        except ApiFailure as err:
            print(f"error: {what}: {err}", file=sys.stderr)
            failed = True
            continue
        print(f"{what} deleted")
    if failed:
        sys.exit(1)


def cmd_functions(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.fn_command == "apply":
        from .manifests import read_objects

        for doc in read_objects(Path(args.file)):
            obj = client.apply(doc)
            print(f"{obj['kind'].lower()}/{obj['metadata']['name']} applied")
    elif args.fn_command == "delete":
        _delete_functions(client, args)
    else:
        fns = client.functions()
        if args.output == "json":
            print(json.dumps(fns, indent=2))
            return
        rows = []
        reasons = []
        for f in fns:
            mode = f["spec"].get("queueMode", "auto")
            assigned = f["status"].get("queueAssignment")
            if assigned:
                mode = f"{mode}: {assigned['mode']}"
                reasons.append(
                    f"{f['metadata']['namespace']}/{f['metadata']['name']}: {assigned['mode']}"
                    f" queue since {assigned['since']}: {assigned['reason']}"
                )
            rows.append(
                [
                    f["metadata"]["name"],
                    f["metadata"]["namespace"],
                    "command" if f["spec"].get("command") else "server",
                    str(f["spec"]["maxConcurrency"]),
                    f["status"]["queue"],
                    mode,
                    str(f["status"]["backlog"]),
                    str(f["status"]["ready"]),
                ]
            )
        headers = ["NAME", "ACCOUNT", "MODE", "CONCURRENCY", "QUEUE", "QUEUE MODE", "BACKLOG"]
        print(_table(rows, [*headers, "READY"]))
        for line in reasons:
            print(line)


def cmd_limits(args: argparse.Namespace) -> None:
    got = _client(args).limits()
    if args.output == "json":
        print(json.dumps(got, indent=2))
        return
    print(
        f"account {got['account']}: weight {got['weight']:g}"
        f" (fair sharing {'on' if got['fairness'] else 'off'}),"
        f" history kept {_span(got['retentionSeconds'], exact=True)}"
    )
    throttle = f" (its heaviest senders refused from {got['throttleFrom']:,})"
    fullest = max((q["waiting"] for q in got["queues"]), default=0)
    rows = [
        ["tasks waiting in its fullest queue", f"{fullest:,}", _limit(got["maxBacklog"], throttle)],
        ["submissions a second", "-", _limit(got["maxRate"])],
        ["attempts running at once", _count(got.get("running")),
         _limit(got["maxConcurrency"]) if "maxConcurrency" in got else "-"],
        ["functions", f"{got['functions']:,}", f"{got['maxFunctions']:,}"],
        ["queues of its functions' own", f"{got['ownQueues']:,}", f"{got['maxOwnQueues']:,}"],
        ["functions and configs stored", in_binary_units(got["registeredBytes"]),
         in_binary_units(got["maxRegisteredBytes"])],
        ["task records stored", f"{got['records']:,}, {in_binary_units(got['recordBytes'])}",
         in_binary_units(got["maxRecordBytes"])],
        ["log lines kept", "-", in_binary_units(got["maxLogBytes"])],
        ["audit trail kept", "-", in_binary_units(got["maxEventsBytes"])],
        ["log reads open at once", _count(got.get("logStreams")), f"{got['maxLogStreams']:,}"],
    ]  # fmt: skip
    print(_table(rows, ["", "USED", "LIMIT"]))
    queues = [
        [q["queue"], f"{q['waiting']:,}", f"{q['drainPerSecond']:.3g}"] for q in got["queues"]
    ]
    if queues:
        print()
        print(_table(queues, ["QUEUE", "WAITING", "DRAINED A SECOND"]))


def _count(value: int | None) -> str:
    """A figure an older gateway does not give: '-' rather than a traceback."""
    return "-" if value is None else f"{value:,}"


def _limit(value: float, note: str = "") -> str:
    if not value:
        return "none"
    return f"{int(value):,}{note}" if float(value).is_integer() else f"{value:g}{note}"


def cmd_dev(args: argparse.Namespace) -> None:
    from .dev import run
    from .runtime import keep_private

    keep_private()  # it reads every component's NATS password

    functions = Path(args.functions) if args.functions else None
    sys.exit(
        run(
            Path(args.data_dir),
            args.port,
            args.nats_port,
            functions,
            args.dispatchers,
            args.ack_wait,
        )
    )


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _settings_or_exit() -> None:
    from .settings_check import settings_problem

    problem = settings_problem()
    if problem is not None:
        sys.exit(f"error: {problem}")


def cmd_gateway(args: argparse.Namespace) -> None:
    _settings_or_exit()
    from .runtime import keep_private

    keep_private()
    from .gateway.app import create_app
    from .gateway.server import Server, config
    from .settings import Settings

    _log_to_stderr()
    settings = Settings()
    sockets = [_adopted(args.listen_fd)] if args.listen_fd is not None else None
    app = create_app(settings, Path(args.tokens))
    Server(config(app, args.host, args.port, settings)).run(sockets=sockets)


def cmd_dispatcher(args: argparse.Namespace) -> None:
    _settings_or_exit()
    from .runtime import keep_private

    keep_private()
    from .dispatch.service import run
    from .settings import Settings

    _log_to_stderr()
    held = _adopted(args.metrics_fd) if args.metrics_fd is not None else None
    port = held.getsockname()[1] if held is not None else args.metrics_port
    run(Settings(), port, args.drain_timeout, args.metrics_host, held)


def _adopted(fd: int) -> socket.socket:
    from .held_sockets import adopt

    try:
        return adopt(fd)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_operator(args: argparse.Namespace) -> None:
    from .controllers.main import run
    from .runtime import keep_private

    keep_private()
    run(args.namespace or [], args.all_namespaces, args.metrics_port, args.metrics_host)


def cmd_tokens(args: argparse.Namespace) -> None:
    from .auth import TokenError, issue_token, list_tokens, revoke_token

    path = Path(args.file)
    try:
        if args.action == "create":
            token, entry = issue_token(path, args.name, args.account, args.admin)
            print(token)
            print(f"created {entry['id']} ({_whose(entry)}); shown only this once", file=sys.stderr)
        elif args.action == "list":
            entries = list_tokens(path)
            if args.output == "json":
                print(json.dumps(entries, indent=2))
                return
            rows = [
                [e.get("id") or "-", e.get("name") or "-", _whose(e), e.get("created") or "-"]
                for e in entries
            ]
            print(_table(rows, ["ID", "NAME", "SCOPE", "CREATED"]))
        else:
            for entry in revoke_token(path, args.key):
                print(f"revoked {entry.get('id') or '-'} ({entry.get('name')}, {_whose(entry)})")
    except TokenError as err:
        sys.exit(f"error: {err}")


def _whose(entry: dict[str, Any]) -> str:
    return "admin" if entry.get("admin") else f"account {entry.get('account')}"


def cmd_nats_config(args: argparse.Namespace) -> None:
    from .nats_auth import CHART_FILE, server_config

    text = server_config(None)
    out = Path(args.out) if args.out else CHART_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(out)


def cmd_settings(args: argparse.Namespace) -> None:
    from .settings_reference import markdown, read_all, rows

    try:
        known = read_all()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.markdown:
        print(markdown(known), end="")
        return
    print(_table([list(r) for r in rows(known)], ["VARIABLE", "SET HERE", "DEFAULT"]))
    print("\nwhat each does: docs/settings.md (kubetask settings --markdown)")


def cmd_crds(args: argparse.Namespace) -> None:
    from .crdgen import OUTPUTS, write_crds

    for out in [Path(args.out)] if args.out else OUTPUTS:
        for path in write_crds(out):
            print(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetask", description=__doc__)
    p.add_argument(
        "--version", action="version", version=f"kubetask {metadata.version('kubetask')}"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="API address (KUBETASK_URL)")
    common.add_argument("--token", help="bearer token (KUBETASK_TOKEN)")
    common.add_argument("--account", help="account to act on (admins; tenants default to theirs)")
    common.add_argument("--admin", action="store_true", help="use the dev admin token")
    common.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    common.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run the embedded platform (NATS, gateway, dispatcher)")
    dev.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    dev.add_argument(
        "--port", type=port_number, default=8080, help="the API's port; 0: any free one"
    )
    dev.add_argument(
        "--nats-port", type=port_number, default=4222, help="NATS's port; 0: any free one"
    )
    dev.add_argument("--functions", "-f", help="YAML of TaskFunction/AsyncConfig objects to apply")
    dev.add_argument("--dispatchers", type=_whole(1, 64, "a number of dispatchers"), default=1)
    dev.add_argument(
        "--ack-wait",
        type=_seconds(1, 3600),
        help="seconds before a silent dispatcher's task is taken over",
    )
    dev.set_defaults(func=cmd_dev)

    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=port_number, default=8080)
    gw.add_argument("--tokens", required=True, help="JSON file of hashed tokens")
    gw.add_argument(
        "--listen-fd",
        type=descriptor,
        help="serve on this inherited listening socket instead of binding --host/--port"
        " (how kubetask dev keeps the port across restarts)",
    )
    gw.set_defaults(func=cmd_gateway)

    dp = sub.add_parser("dispatcher", help="run a dispatcher")
    dp.add_argument(
        "--metrics-port", type=port_number, help="serve Prometheus metrics on this port"
    )
    dp.add_argument("--metrics-host", default="127.0.0.1")
    dp.add_argument(
        "--metrics-fd",
        type=descriptor,
        help="serve metrics on this inherited listening socket (as kubetask dev does)",
    )
    dp.add_argument("--drain-timeout", type=_seconds(0, 3600), default=30.0)
    dp.set_defaults(func=cmd_dispatcher)

    op = sub.add_parser("operator", help="run the Kubernetes operator (uses the kubeconfig)")
    op.add_argument("--namespace", "-n", action="append", help="watch only these (repeatable)")
    op.add_argument("--all-namespaces", "-A", action="store_true")
    op.add_argument(
        "--metrics-port", type=port_number, help="serve Prometheus metrics on this port"
    )
    op.add_argument("--metrics-host", default="127.0.0.1")
    op.set_defaults(func=cmd_operator)

    # One parser per action, so options and the key may come in any order (one parser taking
    # the action and the key as two positionals refused `revoke --file F KEY`).
    token_file = argparse.ArgumentParser(add_help=False)
    token_file.add_argument("--file", required=True, help="the token file the gateway reads")
    tok = sub.add_parser("tokens", help="create, list or revoke API tokens")
    actions = tok.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[token_file], help="create a token")
    create.add_argument("--account", help="the one account the token acts on")
    create.add_argument("--name", help="a name to find it by (default: the account)")
    create.add_argument("--admin", action="store_true", help="a token for every account")
    listing = actions.add_parser("list", parents=[token_file], help="list the tokens")
    listing.add_argument("-o", "--output", choices=["table", "json"], default="table")
    revoke = actions.add_parser("revoke", parents=[token_file], help="revoke a token")
    revoke.add_argument("key", help="the token's id or name")
    tok.set_defaults(func=cmd_tokens)

    nc = sub.add_parser(
        "nats-config", help="write NATS users and permissions for the Helm chart (nats_auth.py)"
    )
    nc.add_argument("--out", help="file (default: the chart's files/nats-authorization.conf)")
    nc.set_defaults(func=cmd_nats_config)

    st = sub.add_parser(
        "settings", help="every KUBETASK_* setting: its value in this environment and default"
    )
    st.add_argument(
        "--markdown", action="store_true", help="the whole reference (docs/settings.md)"
    )
    st.set_defaults(func=cmd_settings)

    crds = sub.add_parser("crds", help="generate the CRD manifests from the models")
    crds.add_argument("action", choices=["generate"])
    crds.add_argument("--out", help="one directory (default: crds/ and the chart's crds/)")
    crds.set_defaults(func=cmd_crds)

    s = sub.add_parser("submit", parents=[common], help="submit a task")
    s.add_argument("function")
    given = s.add_mutually_exclusive_group()
    given.add_argument("--payload", "-p", help="JSON payload")
    given.add_argument("--payload-file", help="file with the JSON payload, - for stdin")
    s.add_argument("--id", help="task id (e.g. a trace id)")
    s.set_defaults(func=cmd_submit)

    g = sub.add_parser("get", parents=[common], help="show one task")
    g.add_argument("id")
    g.set_defaults(func=cmd_get)

    d = sub.add_parser(
        "describe", parents=[common], help="one task: status, what happened, its last log lines"
    )
    d.add_argument("id")
    d.add_argument("--tail", type=line_count, default=20, help="how many log lines (default 20)")
    d.set_defaults(func=cmd_describe)

    lg = sub.add_parser(
        "login", parents=[common], help="a shell or a command in the pod running a task"
    )
    lg.add_argument("id")
    lg.add_argument("command", nargs="*", help="after --; default: sh")
    lg.add_argument("--kubectl", default=os.environ.get("KUBECTL", "kubectl"))
    lg.set_defaults(func=cmd_login)

    ls = sub.add_parser("list", parents=[common], help="list tasks, filtered")
    ls.add_argument("--function")
    ls.add_argument("--status", help="phase, or several separated by commas")
    ls.add_argument("--prefix", help="task-id prefix")
    for bound in ("after", "before"):
        ls.add_argument(
            f"--started-{bound}",
            type=point_in_time,
            help="a time (2026-01-31T08:00:00Z; a date, or no zone: UTC) or a span ago (2h, 7d)",
        )
    ls.add_argument(
        "--limit",
        type=_whole(1, 1 << 31, "a number of tasks"),
        default=100,
        help="at most this many tasks (default 100), read a page of up to 1000 at a time",
    )
    ls.add_argument("--all", action="store_true", help="follow the cursor through every page")
    ls.add_argument("--cursor", help="go on from where a list ended (it prints its cursor)")
    ls.set_defaults(func=cmd_list)

    for action in ("stop", "pause", "resume", "delete"):
        a = sub.add_parser(action, parents=[common], help=f"{action} a task")
        a.add_argument("id")
        a.set_defaults(func=cmd_action)

    lim = sub.add_parser(
        "limits", parents=[common], help="the account's back-pressure limits, quotas and queues"
    )
    lim.set_defaults(func=cmd_limits)

    lg = sub.add_parser("logs", parents=[common], help="print a task's logs")
    lg.add_argument("id")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.set_defaults(func=cmd_logs)

    fn = sub.add_parser("functions", parents=[common], help="manage functions and async configs")
    fsub = fn.add_subparsers(dest="fn_command", required=True)
    ap = fsub.add_parser("apply", parents=[common])
    ap.add_argument("-f", "--file", required=True)
    fsub.add_parser("list", parents=[common])
    fd = fsub.add_parser("delete", parents=[common])
    fd.add_argument("name", nargs="?", help="a function")
    fd.add_argument("-f", "--file", help="every TaskFunction and AsyncConfig in this manifest")
    fn.set_defaults(func=cmd_functions)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `login ID [options] -- CMD...`: argparse cannot take a command after options that follow
    # a positional, so what follows `--` is the command, as for kubectl exec.
    trailing = None
    if "login" in argv and "--" in argv and argv.index("login") < argv.index("--"):
        cut = argv.index("--")
        argv, trailing = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    if trailing is not None:
        args.command = [*args.command, *trailing]
    if args.func not in (cmd_dev, cmd_gateway, cmd_dispatcher, cmd_operator):
        sys.stdout = cast(TextIO, InertStream(sys.stdout))
        sys.stderr = cast(TextIO, InertStream(sys.stderr))
    try:
        args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`kubetask logs ID | head`): stop quietly, as other tools do,
        # and keep Python from complaining again when it flushes stdout on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except (ApiFailure, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    except httpx.InvalidURL as err:
        # Raised by httpx before anything is sent, for an id or filter as long as a page.
        sys.exit(f"error: a value given is too long to send ({err})")
    except httpx.TransportError as err:
        sys.exit(f"error: cannot reach the kubetask API ({err}); is `kubetask dev` running?")
    except KeyboardInterrupt:
        pass
