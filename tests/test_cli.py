"""The `kubetask` command against the running gateway, as a user would type it."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from harness import Api, kt, tasks_of
from kubetask import task_events
from kubetask.auth import issue_token, revoke_token
from kubetask.plane import DataPlane


async def test_cli_end_to_end(api: Api, gateway_url: str) -> None:
    fn_file = api.workdir / "fns.yaml"
    fn_file.write_text(
        textwrap.dedent(f"""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {{name: greet}}
        spec:
          command: [{json.dumps(sys.executable)}, "-c", "import json,sys; print('hi', file=sys.stderr); print(json.dumps(json.load(sys.stdin)))"]
        ---
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {{name: greet}}
        spec:
          <<: {{function: greet, maxAsyncRetryAttempts: 3}}
          maxAsyncRetryAttempts: 1
    """)
    )
    applied = await kt(api, gateway_url, "functions", "apply", "-f", str(fn_file))
    assert applied.stdout.splitlines() == [
        "taskfunction/greet applied",
        "asyncconfig/greet applied",
    ]
    # A key written beside a merge overrides the merged one; that is not a key given twice.
    config = (await api.http.get("/v1/asyncconfigs/greet")).json()
    assert config["spec"]["maxAsyncRetryAttempts"] == 1, config
    listing = await kt(api, gateway_url, "functions", "list")
    assert listing.stdout.split("\n")[1].split()[:3] == ["greet", api.account, "command"]

    submitted = await kt(
        api, gateway_url, "submit", "greet", "-p", '{"name": "ada"}', "--id", "cli-1"
    )
    assert submitted.stdout.strip() == "cli-1"
    done = await api.wait("cli-1")
    got = json.loads((await kt(api, gateway_url, "get", "cli-1", "-o", "json")).stdout)
    assert got["status"] == done["status"] and got["status"]["result"] == {"name": "ada"}
    table = (await kt(api, gateway_url, "list", "--status", "Succeeded", "--prefix", "cli-")).stdout
    assert table.splitlines()[0].split()[:4] == ["ID", "ACCOUNT", "FUNCTION", "PHASE"]
    assert table.splitlines()[1].split()[:4] == ["cli-1", api.account, "greet", "Succeeded"]
    logs = (await kt(api, gateway_url, "logs", "cli-1")).stdout
    assert "[1 stderr] hi" in logs and "task Succeeded" in logs

    dup = await kt(api, gateway_url, "submit", "greet", "--id", "cli-1", check=False)
    assert dup.returncode != 0 and "HTTP 409" in dup.stderr and "already exists" in dup.stderr
    bad = await kt(api, gateway_url, "resume", "cli-1", check=False)
    assert bad.returncode != 0 and "cannot resume the task: the task is Succeeded" in bad.stderr
    gone = await kt(api, gateway_url, "delete", "cli-1")
    assert gone.stdout.strip() == "cli-1: deleted"
    missing = await kt(api, gateway_url, "get", "cli-1", check=False)
    assert "HTTP 404" in missing.stderr
    # An id no route can hold was answered with a bare "Not Found".
    for command in ("get", "logs", "delete"):
        for odd in ("../x", "a/b", ""):
            out = await kt(api, gateway_url, command, odd, check=False)
            assert out.returncode == 1 and "HTTP 404: no such path" in out.stderr, out.stderr
            assert "never holds a '/'" in out.stderr, out.stderr


async def test_limits_shows_the_accounts_own_limits_and_use(api: Api, gateway_url: str) -> None:
    await api.function("held", command=["sleep", "30"], maxConcurrency=1)
    for _ in range(3):
        assert (await api.http.post("/v1/tasks", json={"function": "held"})).status_code == 202
    as_json = json.loads((await kt(api, gateway_url, "limits", "-o", "json")).stdout)
    assert as_json["account"] == api.account and as_json["functions"] == 1, as_json
    table = (await kt(api, gateway_url, "limits")).stdout
    assert table.startswith(f"account {api.account}: weight 1 (fair sharing on)"), table
    cells = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[2:12]]
    rows = {label: rest for label, *rest in cells}
    assert rows["functions"] == ["1", "10,000"], table
    assert rows["submissions a second"] == ["-", "none"], table
    running = rows["attempts running at once"]
    assert running[0] in ("0", "1") and running[1] == f"{as_json['maxConcurrency']:,}", table
    assert rows["log reads open at once"] == ["0", f"{as_json['maxLogStreams']:,}"], table
    waiting = rows["tasks waiting in its fullest queue"]
    assert waiting[1].startswith(f"{as_json['maxBacklog']:,} (its heaviest"), table
    assert int(waiting[0]) == max(q["waiting"] for q in as_json["queues"]), table
    queues = table.split("\n\n", 1)[1].splitlines()
    assert queues[0].split() == ["QUEUE", "WAITING", "DRAINED", "A", "SECOND"], table
    assert [q["queue"] for q in as_json["queues"]] == [line.split()[0] for line in queues[1:]]


async def test_describe_shows_every_attempt_and_the_last_log_lines(
    api: Api, gateway_url: str
) -> None:
    """A task that fails once and then succeeds: `describe` tells that story from the audit
    trail, names where it ran, and ends with its own last log lines."""
    marker = api.workdir / "failed-once"
    script = (
        "import os, sys\n"
        f"m = {str(marker)!r}\n"
        "for i in range(30): print(f'line {i}', file=sys.stderr)\n"
        "if not os.path.exists(m):\n"
        "    open(m, 'w').close(); print('first try fails', file=sys.stderr); sys.exit(3)\n"
        "print('42')\n"
    )
    await api.function("twice", command=[sys.executable, "-c", script])
    await api.async_config("twice", function="twice", maxAsyncRetryAttempts=2)
    await api.submit("twice", task_id="desc-1")
    await api.wait("desc-1")

    trail = await api.call("GET", "/v1/tasks/desc-1/events", 200)
    phases = [e["phase"] for e in trail]
    assert phases[0] in ("Pending", "Queued") and phases[-1] == "Succeeded", phases
    assert phases.count("Running") == 2 and "Retrying" in phases, phases
    failed = next(e for e in trail if e["phase"] == "Retrying")
    assert failed["attempts"] == 1 and "code 3" in failed["error"], failed
    assert trail[-1]["attempts"] == 2 and trail[-1]["executor"]["backend"] == "local"
    times = [e["time"] for e in trail]
    assert times == sorted(times)

    out = json.loads((await kt(api, gateway_url, "describe", "desc-1", "-o", "json")).stdout)
    assert out["task"]["status"]["phase"] == "Succeeded" and out["events"] == trail
    assert out["logs"][-1]["line"].endswith("task Succeeded")
    assert len(out["logs"]) == 20  # the default tail, from over 60 lines

    text = (await kt(api, gateway_url, "describe", "desc-1", "--tail", "3")).stdout
    assert "phase Succeeded, 2 attempt(s)" in text
    assert "Retrying" in text and "exited with code 3" in text
    assert "logs (last 3 lines):" in text and text.rstrip().endswith("task Succeeded")
    missing = await kt(api, gateway_url, "describe", "no-such-task", check=False)
    assert missing.returncode != 0 and "HTTP 404" in missing.stderr


async def test_output_cut_short_by_its_reader_ends_quietly(api: Api, gateway_url: str) -> None:
    """`kubetask logs ID | head -1`: once the reader has gone, the CLI stops as a Unix tool
    does (status 128 + SIGPIPE) instead of printing a broken-pipe error."""
    await api.function("chatty", command=["sh", "-c", "seq 1 50"])
    await api.submit("chatty", task_id="chatty-1")
    await api.wait("chatty-1")
    for args in (["logs", "chatty-1"], ["list"], ["describe", "chatty-1"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line
        try:
            proc = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "kubetask", *args, "--url", gateway_url,
                 "--token", api.token],
                stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
            )  # fmt: skip
        finally:
            os.close(write)
        assert (proc.returncode, proc.stderr) == (128 + signal.SIGPIPE, ""), args


async def test_a_payload_that_is_not_json_is_refused_before_anything_is_sent(
    api: Api, gateway_url: str
) -> None:
    await api.function("takes", command=["true"])
    not_json = api.workdir / "plain.txt"
    not_json.write_text("hello\n")
    not_text = api.workdir / "payload.bin"
    not_text.write_bytes(b"\xff\xfe{}")
    missing = api.workdir / "missing.json"
    for args, said in (
        (["-p", "{bad"], "error: the payload is not JSON (key must be a string"),
        (["-p", "NaN"], "error: the payload is not JSON (expected value at line 1 column 1 (NaN"),
        (["-p", '{"x": 1e999}'], "error: the payload is not JSON (numbers must be finite"),
        # Sent as parsed, the second `a` would silently replace the first.
        (["-p", '{"a": 1, "a": 2}'], 'error: the payload is not JSON (duplicate key "a"'),
        (["-p", '[{"a": {"b": 1, "b": 1}}]'], 'error: the payload is not JSON (duplicate key "b"'),
        (["--payload-file", str(not_json)], f"error: the payload in {not_json} is not JSON"),
        # Said as errors, not as Python's exceptions.
        (["--payload-file", str(not_text)], f"error: the payload in {not_text} is not text"),
        (["--payload-file", str(missing)], f"error: cannot read the payload from {missing}: No"),
        (["--payload-file", str(api.workdir)], "error: cannot read the payload from"),
        # A file without end filled the CLI's memory until something killed it.
        (["--payload-file", "/dev/zero"], "error: the payload in /dev/zero is too large"),
    ):
        out = await kt(api, gateway_url, "submit", "takes", *args, "--id", "never", check=False)
        assert out.returncode == 1 and out.stderr.startswith(said), (args, out.stderr)
    both = await kt(
        api, gateway_url, "submit", "takes", "-p", "1", "--payload-file", str(not_json),
        check=False,
    )  # fmt: skip
    assert both.returncode == 2 and "not allowed with argument" in both.stderr, both.stderr
    assert (await api.http.get("/v1/tasks/never")).status_code == 404
    # An empty id (`--id "$TRACE_ID"`, unset) was dropped, and the task got a random one.
    empty = await kt(api, gateway_url, "submit", "takes", "--id", "", check=False)
    assert empty.returncode == 1 and "error: HTTP 422: id: task id" in empty.stderr, empty.stderr
    assert await tasks_of(api, "takes") == []


async def test_list_takes_times_as_a_person_types_them(api: Api, gateway_url: str) -> None:
    """`--started-after 2026-12-01` was a 422 (the API wants a zone); a date, a time without a
    zone (UTC) and a span ago (`2h`) are what people type."""
    await api.function("timed", command=["true"])
    tid = (await api.submit("timed"))["metadata"]["name"]
    started = (await api.wait(tid))["status"]["timestamps"]["started"]
    moment = datetime.fromisoformat(started.replace("Z", "+00:00"))
    today = moment.date().isoformat()
    tomorrow = (moment + timedelta(days=1)).date().isoformat()
    no_zone = (moment - timedelta(minutes=1)).replace(tzinfo=None).isoformat(timespec="seconds")
    for flags, found in (
        (["--started-after", today], True),
        (["--started-after", tomorrow], False),
        (["--started-before", tomorrow], True),
        (["--started-after", no_zone], True),
        (["--started-after", "1h"], True),
        (["--started-before", "1h"], False),
        (["--started-after", "30d", "--started-before", "2d"], False),
    ):
        out = await kt(api, gateway_url, "list", "--function", "timed", *flags)
        assert (tid in out.stdout) is found, (flags, out.stdout)
    far = ("99999999999999h", "9999999999h", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00+01:00")
    for bad in ("yesterday", "2026-13-01", "5y", "-1h", "²h", *far):  # `²` is a digit to isdigit
        out = await kt(api, gateway_url, "list", f"--started-after={bad}", check=False)
        assert out.returncode == 2 and "is not a time" in out.stderr, (bad, out.stderr)


async def test_list_gives_as_many_as_asked_across_short_pages_and_goes_on_from_a_cursor(
    api: Api, gateway_url: str
) -> None:
    """A page of large tasks ends at the gateway's byte budget before `limit` (four of these
    a page here); `list --limit N` still shows N, and the cursor it prints for the rest is one
    `--cursor` takes."""
    await api.function("wide", command=["true"])
    for i in range(10):
        await api.submit("wide", payload="w" * 60_000, task_id=f"wide-{i}")

    def ids(out: subprocess.CompletedProcess[str]) -> list[str]:
        return [t["metadata"]["name"] for t in json.loads(out.stdout)]

    listed = await kt(api, gateway_url, "list", "--prefix", "wide-", "--limit", "9", "-o", "json")
    assert ids(listed) == [f"wide-{i}" for i in range(9)]
    table = await kt(api, gateway_url, "list", "--prefix", "wide-", "--limit", "2")
    assert f"pass --cursor {api.account}/wide-1" in table.stderr, table.stderr
    rest = await kt(
        api, gateway_url, "list", "--prefix", "wide-", "--cursor", f"{api.account}/wide-1",
        "--all", "-o", "json",
    )  # fmt: skip
    assert ids(rest) == [f"wide-{i}" for i in range(2, 10)]
    bad = await kt(api, gateway_url, "list", "--cursor", "no-slash", check=False)
    assert bad.returncode == 1 and "HTTP 422: malformed cursor" in bad.stderr, bad.stderr


async def test_list_limit_is_a_number_of_tasks_however_many_pages_it_takes(
    api: Api, gateway_url: str
) -> None:
    """`list --limit 1050` was refused as "not a page size (1 to 1000)", the API's page bound,
    and `-o json` dropped the cursor of what was left without a word: a script could not tell
    a listing cut short from a whole one. The hint goes to stderr, so stdout stays JSON."""
    await api.function("many", command=["true"])
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with sem:
            await api.submit("many", task_id=f"many-{i:04}")

    await asyncio.gather(*(one(i) for i in range(1060)))
    listed = await kt(
        api, gateway_url, "list", "--prefix", "many-", "--limit", "1050", "-o", "json"
    )
    names = [t["metadata"]["name"] for t in json.loads(listed.stdout)]
    assert names == [f"many-{i:04}" for i in range(1050)]
    assert f"pass --cursor {api.account}/many-1049" in listed.stderr, listed.stderr
    whole = await kt(api, gateway_url, "list", "--prefix", "many-", "--all", "-o", "json")
    assert len(json.loads(whole.stdout)) == 1060 and "more:" not in whole.stderr, whole.stderr


async def test_a_trail_whose_latest_revision_never_arrives_is_returned_as_it_is(
    api: Api, plane: DataPlane
) -> None:
    """The wait for the audit stream's sourcing is bounded: a record it never receives (here
    one that was never written) ends the wait with the trail as far as it goes."""
    await api.function("told", command=["true"])
    await api.submit("told", task_id="told-1")
    await api.wait("told-1")
    trail = await task_events.read(plane.nc, api.account, "told-1", latest=b"never written")
    assert [e.phase for e in trail][-1] == "Succeeded"


def _tokens(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubetask tokens ARGS --file PATH`, as typed."""
    return subprocess.run(
        [sys.executable, "-m", "kubetask", "tokens", *args, "--file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_tokens_created_and_revoked_at_once_are_all_kept(tmp_path: Path) -> None:
    """Two edits of the token file at once each wrote it without the other's change (or
    failed, renaming a temporary file the other had renamed already)."""
    path = tmp_path / "tokens.json"
    made = await asyncio.gather(
        *(asyncio.to_thread(issue_token, path, None, f"team-{i}") for i in range(48))
    )
    kept = {e["id"] for e in json.loads(path.read_text())["tokens"]}
    assert kept == {entry["id"] for _, entry in made}
    await asyncio.gather(
        *(asyncio.to_thread(revoke_token, path, entry["id"]) for _, entry in made[:24]),
        *(asyncio.to_thread(issue_token, path, None, "late") for _ in range(8)),
    )
    left = json.loads(path.read_text())["tokens"]
    assert len(left) == 24 + 8 and not {e["id"] for e in left} & {e["id"] for _, e in made[:24]}
    listed = await asyncio.to_thread(_tokens, path, "list", "-o", "json")
    assert len(json.loads(listed.stdout)) == 32, listed.stdout + listed.stderr


async def test_tokens_need_a_scope_and_can_be_listed_and_revoked(
    make_api: Any, gateway_url: str, tokens_file: Path
) -> None:
    api = await make_api()

    def tokens(*args: str) -> subprocess.CompletedProcess[str]:
        return _tokens(tokens_file, *args)

    refused = await asyncio.to_thread(tokens, "create")
    assert refused.returncode != 0 and "--account NAME, or --admin" in refused.stderr
    for bad in ("Bad.Account 1!", "a.b", "*", "x" * 64, ""):
        refused = await asyncio.to_thread(tokens, "create", "--account", bad)
        assert refused.returncode != 0 and "not a valid name" in refused.stderr, refused.stderr
    made = await asyncio.to_thread(tokens, "create", "--account", api.account, "--name", "ci-bot")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    listed = json.loads((await asyncio.to_thread(tokens, "list", "-o", "json")).stdout)
    mine = [e for e in listed if e["name"] == "ci-bot"]
    assert mine and mine[0]["account"] == api.account and "sha256" not in mine[0]
    async with httpx.AsyncClient(
        base_url=gateway_url, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        assert (await http.get("/v1/tasks")).status_code == 200
        revoked = await asyncio.to_thread(tokens, "revoke", mine[0]["id"])
        assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
        await asyncio.sleep(1.1)
        resp = await http.get("/v1/tasks")
        assert resp.status_code == 401 and resp.json()["error"] == "invalid token"
    assert (await asyncio.to_thread(tokens, "revoke", "no-such-token")).returncode != 0
    # Options before the key as well: `revoke --file F KEY` was refused as an extra argument.
    again = await asyncio.to_thread(tokens, "create", "--account", api.account, "--name", "two")
    assert again.returncode == 0, again.stderr
    typed = ["tokens", "revoke", "--file", str(tokens_file), "two"]
    revoked = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "kubetask", *typed],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr


def test_numbers_on_the_command_line_are_held_to_their_range(tmp_path: Path) -> None:
    """`dev --port 70000` ended in a traceback, `dev --dispatchers 0` started a platform that
    would never run a task, and `--ack-wait 0.5` one whose dispatcher failed at every start."""
    for args in (
        ["dev", "--port", "70000"],
        ["dev", "--nats-port", "-1"],
        ["dev", "--port", "http"],
        ["dev", "--dispatchers", "0"],
        ["dev", "--ack-wait", "nan"],
        ["dev", "--ack-wait", "0.5"],
        ["gateway", "--tokens", "t.json", "--port", "65536"],
        ["dispatcher", "--metrics-port", "99999"],
        ["gateway", "--tokens", "t.json", "--listen-fd", "-1"],
        ["dispatcher", "--metrics-fd", "three"],
        ["dispatcher", "--drain-timeout", "-1"],
        ["describe", "x", "--tail=-5"],
        ["list", "--limit", "0"],
        ["list", "--limit", "1e3"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "kubetask", *args],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert out.returncode == 2, (args, out.stderr)
        assert "error: argument" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / ".kubetask-data").exists()  # nothing was started


def test_a_data_directory_that_cannot_be_one_is_said_at_once(tmp_path: Path) -> None:
    """A file, or a path under nothing, given as `--data-dir` ended in a bare errno line."""
    (tmp_path / "a-file").write_text("")
    for data, why in (
        (tmp_path / "a-file", "it is not a directory"),
        (Path("/proc/kubetask-nowhere"), "No such file or directory"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "kubetask", "dev", "--data-dir", str(data), "--nats-port", "0",
             "--port", "0"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        said = f"error: cannot use {data} as the data directory: {why}; choose another with"
        assert said in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_descriptor_to_serve_on_must_be_a_listening_socket(tmp_path: Path) -> None:
    """`--listen-fd` and `--metrics-fd` (how `kubetask dev` hands its held ports over) say what
    is wrong with a descriptor at once, rather than serving on nothing."""
    (tmp_path / "t.json").write_text("{}")
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, never listening
        for args, fd, said in (
            (["gateway", "--tokens", "t.json", "--listen-fd"], 0, "is not a socket"),
            (["dispatcher", "--metrics-fd"], 77, "is not a socket"),
            (["gateway", "--tokens", "t.json", "--listen-fd"], bound.fileno(), "not a listening"),
            (["dispatcher", "--metrics-fd"], bound.fileno(), "not a listening TCP socket"),
        ):
            out = subprocess.run(
                [sys.executable, "-m", "kubetask", *args, str(fd)],
                capture_output=True, text=True, timeout=60, cwd=tmp_path,
                stdin=subprocess.DEVNULL, pass_fds=(bound.fileno(),),
            )  # fmt: skip
            assert out.returncode == 2, (args, fd, out.stderr)
            assert said in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_an_address_or_a_token_that_cannot_be_the_apis_is_an_error_not_a_traceback(
    tmp_path: Path,
) -> None:
    """`--url http://[::1` ended in httpx's traceback, a non-ASCII token in "'ascii' codec
    can't encode", and a URL reaching some other web server printed its HTML page as the
    error. Another server is run for real here: a directory served by Python's. An id or a
    filter longer than a URL holds ended in httpx's traceback too."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "tasks").write_text("<html>not an API</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    elsewhere = f"http://127.0.0.1:{other.server_address[1]}"
    try:
        for url, token, args, said in (
            ("http://[::1", "kt_x", ["get", "x"], "is not the API's URL"),
            ("localhost:8080", "kt_x", ["get", "x"], "is not the API's URL"),
            ("ftp://example.com", "kt_x", ["get", "x"], "is not the API's URL"),
            ("http://127.0.0.1:99999", "kt_x", ["get", "x"], "its port is not 1 to 65535"),
            (elsewhere, "kt_\u00e9", ["get", "x"], "the token holds characters"),
            (elsewhere, "kt_x y", ["list"], "the token holds characters"),
            (elsewhere, "kt_x", ["get", "x"], "HTTP 404: this is not the kubetask API"),
            (elsewhere, "kt_x", ["list"], "HTTP 200: this is not the kubetask API"),
            (elsewhere, "kt_x", ["functions", "list"], "HTTP 404: this is not the kubetask API"),
            (elsewhere, "kt_x", ["logs", "x"], "HTTP 404: this is not the kubetask API"),
            *(
                (elsewhere, "kt_x", args, "a value given is too long to send")
                for args in (
                    ["get", "a" * 70_000],
                    ["stop", "a" * 70_000],
                    ["logs", "-f", "a" * 70_000],
                    ["list", "--function", "a" * 70_000],
                    ["limits", "--account", "a" * 70_000],
                    ["functions", "delete", "a" * 70_000],
                )
            ),
        ):
            out = subprocess.run(
                [sys.executable, "-m", "kubetask", *args, "--url", url, "--token", token],
                capture_output=True, text=True, timeout=60, cwd=tmp_path,
            )  # fmt: skip
            assert out.returncode == 1, (url, args, out.stderr)
            assert out.stderr.startswith("error: ") and said in out.stderr, (url, out.stderr)
            assert "Traceback" not in out.stderr and "<html>" not in out.stderr, out.stderr
            assert "kt_x" not in out.stderr  # the token is a secret
    finally:
        other.shutdown()


def test_the_version_is_the_installed_packages() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kubetask", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout) == (0, f"kubetask {metadata.version('kubetask')}\n")


def test_a_token_file_that_is_missing_or_broken_is_an_error_and_is_left_alone(
    tmp_path: Path,
) -> None:
    """`tokens create` on a file it cannot read used to write a file holding only the new
    token: every other token in it was gone."""
    missing = tmp_path / "none.json"
    for args in (["list"], ["revoke", "x"]):
        said = _tokens(missing, *args)
        assert said.returncode == 1 and "there is no token file at" in said.stderr, said.stderr
    assert not missing.exists()
    for text in ('{"tokens": [{"id": "tok_1", "sha256": "ab"}', '["tok_1"]', '{"tokens": 3}'):
        broken = tmp_path / "broken.json"
        broken.write_text(text)
        for args in (["create", "--account", "a"], ["list"], ["revoke", "tok_1"]):
            said = _tokens(broken, *args)
            assert said.returncode == 1 and "nothing was changed" in said.stderr, said.stderr
            assert "Traceback" not in said.stderr
            assert broken.read_text() == text
    empty = tmp_path / "empty.json"
    for text in ("", "{}"):  # holds no tokens yet
        empty.write_text(text)
        assert _tokens(empty, "list").returncode == 0
        assert _tokens(empty, "create", "--account", "a").returncode == 0
        assert len(json.loads(empty.read_text())["tokens"]) == 1


def test_a_token_for_a_kubernetes_system_namespace_is_refused(tmp_path: Path) -> None:
    """Accounts are namespaces, and a function's pods may read their namespace's Secrets and
    act as its service accounts: `kube-system`'s are the cluster's controllers'."""
    path = tmp_path / "tokens.json"
    for account in ("kube-system", "kube-public", "kube-node-lease", "kube-x"):
        said = _tokens(path, "create", "--account", account)
        assert said.returncode == 1 and "is reserved" in said.stderr, said.stderr
        assert "Traceback" not in said.stderr
    assert not path.exists()
    assert _tokens(path, "create", "--account", "kubex").returncode == 0  # only the prefix


async def test_a_manifest_that_is_not_a_list_of_objects_is_an_error(
    api: Api, gateway_url: str
) -> None:
    """`functions apply -f` with a file that is not a manifest says what is wrong with it."""
    cases = {
        "passwd": ("root:x:0:0:root:/root:/bin/bash\n", "document 1 of {} is a string"),
        "empty": ("", "{} holds no objects to apply"),
        "only-separators": ("---\n---\n", "{} holds no objects to apply"),
        "list": ("- a\n- b\n", "document 1 of {} is a list"),
        "second": ("kind: TaskFunction\n---\n7\n", "document 2 of {} is a number"),
        "metadata": ("kind: TaskFunction\nmetadata: x\n", "metadata must be an object"),
        "yaml": ("a: [\n", "{} is not valid YAML"),
        "twice": (
            "kind: TaskFunction\nmetadata: {name: t}\nspec:\n  command: [cat]\n  command: [sh]\n",
            "found the key 'command' twice",
        ),
        "laughs": (  # nine levels of nine aliases: 9^8 strings, 389 MB of JSON
            "a: &a [x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n"
                for a, b in zip("abcdefg", "bcdefgh", strict=True)
            )
            + "kind: TaskFunction\nmetadata: {name: laughs}\nspec: {command: [true], env: {X: *h}}\n",
            "document 1 of {} holds over 100,000 values once its YAML aliases are written out",
        ),
        "loop": (
            "kind: TaskFunction\nmetadata: {name: loop}\nspec: &s {command: [true], env: {X: *s}}\n",
            "document 1 of {} holds itself (a YAML alias loop)",
        ),
    }
    for name, (text, said) in cases.items():
        path = api.workdir / f"{name}.yaml"
        path.write_text(text)
        out = await kt(api, gateway_url, "functions", "apply", "-f", str(path), check=False)
        assert out.returncode == 1 and said.format(path) in out.stderr, (name, out.stderr)
        assert "Traceback" not in out.stderr
    for name in ("laughs", "loop"):
        assert (await api.http.get(f"/v1/functions/{name}")).status_code == 404
    endless = await kt(api, gateway_url, "functions", "apply", "-f", "/dev/zero", check=False)
    assert endless.returncode == 1, endless.stderr
    assert endless.stderr == "error: /dev/zero holds more than 64 MiB; nothing was sent\n"
    directory = await kt(
        api, gateway_url, "functions", "apply", "-f", str(api.workdir), check=False
    )
    assert directory.stderr == f"error: cannot read {api.workdir}: Is a directory\n"
    binary = api.workdir / "binary.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    out = await kt(api, gateway_url, "functions", "apply", "-f", str(binary), check=False)
    assert out.returncode == 1 and "is not a text (UTF-8) file" in out.stderr, out.stderr


async def test_yaml_values_json_cannot_hold_are_refused_and_dates_stay_strings(
    api: Api, gateway_url: str
) -> None:
    """YAML holds what JSON cannot. An unquoted date was a `TypeError` traceback; `kubectl`
    reads it as the string written, and so does the CLI. The rest is refused, saying where,
    and nothing is sent."""
    head = "kind: TaskFunction\nmetadata: {name: %s}\n"
    cases = {
        "nan": ("spec: {command: [true], timeoutSeconds: .nan}", "spec.timeoutSeconds is nan"),
        "inf": ("spec: {command: [true], timeoutSeconds: -.inf}", "spec.timeoutSeconds is -inf"),
        "binary": ("spec: {command: [!!binary aGk=]}", "spec.command[0] is binary (!!binary)"),
        "set": ("spec: !!set {a, b}", "spec is a set (!!set)"),
        "key": ("spec: {? !!binary aGk= : 1}", "a key in spec is binary (!!binary)"),
        "stamp": ("spec: {command: [!!timestamp 2001-12-14]}", "spec.command[0] is a date"),
        "deep": ("spec: {command: [true], x: %s}" % ("[" * 2000 + "]" * 2000), "too deeply"),
    }
    for name, (spec, said) in cases.items():
        path = api.workdir / f"{name}.yaml"
        path.write_text(head % name + spec + "\n")
        out = await kt(api, gateway_url, "functions", "apply", "-f", str(path), check=False)
        assert out.returncode == 1 and said in out.stderr, (name, out.stderr)
        assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr, out.stderr
        assert (await api.http.get(f"/v1/functions/{name}")).status_code == 404
    dated = api.workdir / "dated.yaml"
    dated.write_text(
        "kind: TaskFunction\nmetadata:\n  name: dated\n  labels: {since: 2001-12-14}\n"
        "spec: {command: [sh], env: [{name: AT, value: 2001-12-14t21:59:43.10-05:00}]}\n"
    )
    out = await kt(api, gateway_url, "functions", "apply", "-f", str(dated), check=False)
    assert out.returncode == 0, out.stderr
    got = (await api.http.get("/v1/functions/dated")).json()
    assert got["metadata"]["labels"] == {"since": "2001-12-14"}
    assert got["spec"]["env"] == [{"name": "AT", "value": "2001-12-14t21:59:43.10-05:00"}]


async def test_what_others_wrote_is_shown_not_obeyed_by_the_terminal(
    api: Api, gateway_url: str
) -> None:
    """A task's output and error reach whoever reads them, an admin included: an escape
    sequence in them retitled the terminal, cleared it or moved the cursor, a CR overwrote a
    line, a bidi override reordered it. The CLI shows them as escapes; JSON keeps them."""
    said = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\rover\u202ex\x9b1m\ttab"
    script = f"import sys; sys.stderr.write({said!r} + '\\n'); sys.exit(3)"
    await api.function("loud", command=["python3", "-c", script])
    await api.async_config("loud", function="loud", maxAsyncRetryAttempts=0)
    task_id = (await api.submit("loud"))["metadata"]["name"]
    await api.wait(task_id)
    shown = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mred\\x0dover\\u202ex\\x9b1m\ttab"
    for args in (("describe", task_id), ("logs", task_id), ("get", task_id), ("list",)):
        out = (await kt(api, gateway_url, *args)).stdout
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", out), (args, out)
        if args[0] in ("describe", "logs"):
            assert shown in out, (args, out)
    described = json.loads((await kt(api, gateway_url, "describe", task_id, "-o", "json")).stdout)
    assert said in [r["line"] for r in described["logs"]]
    missing = await kt(api, gateway_url, "get", "a\x1b[2Jb", check=False)
    assert missing.returncode == 1 and "a\\x1b[2Jb" in missing.stderr, missing.stderr


async def test_login_needs_a_running_task_in_a_pod(api: Api, gateway_url: str) -> None:
    """`kubetask login` goes where the attempt runs; a local process (`kubetask dev`) or a
    finished task has no pod to enter, and says so instead of guessing."""
    argv, gate = api.gated("held")
    await api.function("held", command=argv)
    await api.submit("held", task_id="login-1")
    try:
        running = await api.wait("login-1", {"Running"})
        executor = running["status"]["executor"]
        assert executor.get("pod") is None and executor["host"]
        local = await kt(api, gateway_url, "login", "login-1", "--", "hostname", check=False)
        assert local.returncode != 0
        assert "runs as a local process on" in local.stderr, local.stderr
        described = (await kt(api, gateway_url, "describe", "login-1")).stdout
        assert f"executor: local {executor['host']} (dispatcher " in described
    finally:
        gate.write_text("open")
    await api.wait("login-1")
    over = await kt(api, gateway_url, "login", "login-1", check=False)
    assert over.returncode != 0 and "is Succeeded: only a running task has a pod" in over.stderr
    missing = await kt(api, gateway_url, "login", "no-such-task", check=False)
    assert missing.returncode != 0 and "HTTP 404" in missing.stderr


async def test_get_names_an_exit_code_only_when_the_attempt_had_one(
    api: Api, gateway_url: str
) -> None:
    """A command that never started has no exit code; `get` said "exit code None". One killed
    by a signal was shown with Popen's negative code: "exit code -9"."""
    await api.function("exits", command=["sh", "-c", "echo broke >&2; exit 3"])
    await api.function("absent", command=[str(api.workdir / "no-such-program")])
    await api.function("shot", command=["sh", "-c", "kill -9 $$"])
    for fn in ("exits", "absent", "shot"):
        await api.async_config(fn, function=fn, maxAsyncRetryAttempts=0)
        await api.submit(fn, task_id=f"code-{fn}")
        await api.wait(f"code-{fn}")
    exited = (await kt(api, gateway_url, "get", "code-exits")).stdout
    assert "error (exit code 3):\nexited with code 3" in exited, exited
    never = (await kt(api, gateway_url, "get", "code-absent")).stdout
    assert "None" not in never, never
    assert "\nerror:\ncould not start: " in never, never
    shot = (await kt(api, gateway_url, "get", "code-shot")).stdout
    assert "error (killed by signal 9):\nkilled by signal 9" in shot, shot


async def test_functions_delete_takes_a_manifest_and_its_configs_go_too(
    api: Api, gateway_url: str
) -> None:
    """Deleting a function by name left its AsyncConfig, which the CLI could not delete at all;
    `delete -f` removes what a manifest applied, configs first, as `kubectl delete -f` does."""
    manifest = api.workdir / "gone.yaml"
    manifest.write_text(
        textwrap.dedent("""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {name: gone}
        spec: {command: ["true"]}
        ---
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: gone-config}
        spec: {function: gone, maxAsyncRetryAttempts: 0}
    """)
    )
    await kt(api, gateway_url, "functions", "apply", "-f", str(manifest))
    deleted = await kt(api, gateway_url, "functions", "delete", "-f", str(manifest))
    assert deleted.stdout.splitlines() == [
        "asyncconfig/gone-config deleted",
        "taskfunction/gone deleted",
    ], deleted.stdout + deleted.stderr
    for path in ("/v1/functions/gone", "/v1/asyncconfigs/gone-config"):
        assert (await api.http.get(path)).status_code == 404
    again = await kt(api, gateway_url, "functions", "delete", "-f", str(manifest), check=False)
    assert again.returncode == 1 and again.stdout == "", again.stdout
    assert again.stderr.count("HTTP 404") == 2, again.stderr
    both = await kt(
        api, gateway_url, "functions", "delete", "gone", "-f", str(manifest), check=False
    )
    assert both.returncode == 1 and "not both" in both.stderr, both.stderr
