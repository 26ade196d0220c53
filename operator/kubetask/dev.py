"""`kubetask dev`: the whole platform on one machine — nats-server, gateway, dispatcher(s) and
local executors — with its data in one directory, so a restart finds every task where it was.

The components run as separate processes, as on Kubernetes, and are tied to this supervisor:
if it is killed (even with SIGKILL) the kernel takes them down too, and a crashed component —
nats-server included — is restarted and the restart logged. Every component connects to NATS as
its own user (`nats_auth`), with passwords generated at first start and kept in
`<data>/secrets/`; function processes get none. Ctrl-C stops everything within about two
seconds: dispatchers and gateway together (running attempts are handed back to the queue),
then NATS.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import held_sockets, nats_auth, private_files, sched_batch, store_budget
from .auth import create_token
from .client import Client
from .embedded import (
    free_port,
    go_runtime_problem,
    nats_argv,
    nats_env,
    port_in_use,
    wait_for_port,
    wait_until_ready,
)
from .executors.function_users import FunctionUsers
from .executors.parent_death import die_with_parent
from .manifests import read_objects
from .settings import Settings
from .sizes import in_binary_units

# Ctrl-C: how long components get to stop before they are killed, and how long dispatchers
# let running attempts go on before handing them back to the queue.
STOP_SECONDS = 1.5
DRAIN_SECONDS = 0.8


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    batch: bool = False  # under SCHED_BATCH (`sched_batch.py`)
    keeps: tuple[int, ...] = ()  # listening sockets each incarnation inherits (`held_sockets.py`)
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=self.keeps,
                preexec_fn=sched_batch.preexec(self.batch, die_with_parent()),
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_lines(self, n: int) -> list[str]:
        """The end of its log: why it stopped, said where the user looks. Only the last few KB
        are read: a log of a long-lived platform may be large, and this runs at each restart."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                tail = f.read().decode(errors="replace")
        except OSError:
            return []
        return tail.strip().splitlines()[-n:]

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)


def stop_all(children: list[Child], timeout: float) -> None:
    """SIGTERM to all at once, SIGKILL to whoever is still there after `timeout`."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(c.running() for c in children) and time.monotonic() < deadline:
        time.sleep(0.02)
    for child in children:
        child.signal(signal.SIGKILL)
        if child.proc is not None:
            child.proc.wait()


def _in_use(port: int, what: str, flag: str, err: OSError | None = None) -> str:
    if err is None or err.errno == errno.EADDRINUSE:
        problem = f"port {port} for the {what} is in use (another kubetask dev?)"
    else:
        problem = f"cannot listen on port {port} for the {what}: {err.strerror}"
    return f"error: {problem}; choose another with {flag}"


def client_config(data_dir: Path) -> Path:
    return data_dir / "client.json"


def ensure_tokens(data_dir: Path) -> dict[str, str]:
    """Create a tenant token (account `default`) and an admin token on first start."""
    cfg_path = client_config(data_dir)
    if cfg_path.exists():
        stored: dict[str, str] = json.loads(cfg_path.read_text())
        return stored
    tokens_file = data_dir / "tokens.json"
    cfg = {
        "token": create_token(tokens_file, "dev", "default"),
        "adminToken": create_token(tokens_file, "dev-admin", None, admin=True),
    }
    private_files.write(cfg_path, json.dumps(cfg, indent=2))
    return cfg


def metrics_token_file(data_dir: Path) -> Path:
    """The 0600 file holding the token Prometheus reads every component's metrics with; made
    on first use and kept. A file, so the token is in no process's environment."""
    path = data_dir / "secrets" / "metrics.token"
    if not path.exists():
        private_files.write(path, secrets.token_urlsafe(24))
    return path


def restrict_data_dir(data_dir: Path) -> None:
    """The data directory's parts readable by the platform's user only: they hold every
    account's tasks (the store, the index) and output (the logs), and secrets. The directory
    itself may be one the user chose and shares, so its own mode is left as it is. A part that
    is not a directory is left for the component that needs it to say so."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for part in ("logs", "index", "jetstream", "secrets"):
        path = data_dir / part
        if not path.exists():
            path.mkdir(mode=0o700)
        if path.is_dir():
            path.chmod(0o700)


def hold_data_dir(data_dir: Path) -> TextIO | None:
    """Lock the data directory for this process's life (the lock goes with the process, however
    it ends). A second `kubetask dev` on the same directory would start a second nats-server on
    the same JetStream store and point the CLI's client.json at itself; it is refused instead."""
    lock = open(data_dir / "dev.lock", "a+")  # held until the process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        print(
            f"error: {data_dir} is in use by another kubetask dev (pid {holder}); stop it, or"
            " choose another --data-dir",
            file=sys.stderr,
            flush=True,
        )
        return None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def run(
    data_dir: Path,
    port: int,
    nats_port: int,
    functions: Path | None,
    dispatchers: int,
    ack_wait: float | None = None,
) -> int:
    from .settings_check import settings_problem  # the dispatcher's modules: not for every CLI call

    data_dir = data_dir.resolve()
    problem = settings_problem() or go_runtime_problem()
    try:
        batch = sched_batch.wanted()
    except ValueError as err:
        batch, problem = False, problem or str(err)
    try:  # a manifest that cannot be read is said before anything starts
        manifests = read_objects(functions) if functions is not None else []
    except ValueError as err:
        problem = problem or str(err)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    # Before the ports: a second dev on this directory holds them too, and is what to name.
    try:
        restrict_data_dir(data_dir)
    except OSError as err:  # a file there, no permission, a read-only file system
        why = "it is not a directory" if data_dir.is_file() else err.strerror
        elsewhere = err.filename and err.filename != str(data_dir)
        print(
            f"error: cannot use {data_dir} as the data directory: {why}"
            f"{f' ({err.filename})' if elsewhere else ''}; choose another with --data-dir",
            file=sys.stderr,
            flush=True,
        )
        return 2
    lock = hold_data_dir(data_dir)
    if lock is None:
        return 2
    if nats_port and port_in_use(nats_port):
        print(_in_use(nats_port, "NATS", "--nats-port"), file=sys.stderr, flush=True)
        return 2
    try:  # held for as long as this runs (`held_sockets.py`); 0: any free port
        api = held_sockets.hold("127.0.0.1", port)
    except OSError as err:
        print(_in_use(port, "API", "--port", err), file=sys.stderr, flush=True)
        return 2
    port = api.getsockname()[1]
    metrics_sockets = [held_sockets.hold("127.0.0.1", 0) for _ in range(dispatchers)]
    metrics_ports = [s.getsockname()[1] for s in metrics_sockets]
    creds = ensure_tokens(data_dir)
    passwords = nats_auth.load_or_create(data_dir / "secrets" / "nats-users.json")
    settings = Settings()
    store = settings.store_max_bytes or store_budget.storage(data_dir)
    nats_config = nats_auth.write_server_config(
        data_dir / "secrets" / "nats.conf", passwords, store
    )
    scrape_path = metrics_token_file(data_dir)
    scrape = {"KUBETASK_METRICS_TOKEN_FILE": str(scrape_path)}
    nats_port = nats_port or free_port()
    nats = Child(
        "nats-server",
        nats_argv(data_dir / "jetstream", nats_port, nats_config),
        nats_env(),
        data_dir / "logs" / "nats.log",
        batch=batch,
    )
    nats.start()
    assert nats.proc is not None
    if batch and nats.running() and not sched_batch.holds(nats.proc.pid):  # gone: said below
        print(
            "note: nats-server runs under the default scheduling policy (SCHED_BATCH refused)",
            file=sys.stderr,
            flush=True,
        )
    try:
        wait_for_port(nats_port, proc=nats.proc)
    except (RuntimeError, TimeoutError) as err:
        print(f"kubetask dev failed to start: nats-server: {err}", file=sys.stderr, flush=True)
        print(f"  nats-server ({nats.log}):", *nats.last_lines(3), sep="\n    ", file=sys.stderr)
        _shutdown([], nats)
        return 1
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, KUBETASK_NATS_URL=f"nats://127.0.0.1:{nats_port}")
    for name in list(env):  # whatever the shell had: each child gets its own below
        if "NATS_USER" in name or "NATS_PASSWORD" in name:
            del env[name]
    if ack_wait is not None:
        env["KUBETASK_ACK_WAIT"] = str(ack_wait)
    env["KUBETASK_STORE_MAX_BYTES"] = str(store)
    lowered = store_budget.caps(store, settings, env)
    if lowered:
        env.update(lowered)
        held = ", ".join(f"{k}={in_binary_units(int(v))}" for k, v in lowered.items())
        print(
            f"note: JetStream has {in_binary_units(store)} on this disk: history held to {held}",
            file=sys.stderr,
            flush=True,
        )
    exe = [sys.executable, "-m", "kubetask"]
    # No tenant's function may answer on these (`executors/platform_ports.py`).
    own = [str(p) for p in (port, *metrics_ports)]
    given = env.get("KUBETASK_PLATFORM_PORTS", "")
    env["KUBETASK_PLATFORM_PORTS"] = ",".join(filter(None, [given, *own]))
    children = [
        Child(
            "gateway",
            [
                *exe,
                "gateway",
                *("--port", str(port), "--listen-fd", str(api.fileno())),
                *("--tokens", str(data_dir / "tokens.json")),
            ],
            {
                **env,
                **nats_auth.env_for("gateway", passwords, data_dir / "secrets"),
                **scrape,
                "KUBETASK_INDEX_PATH": str(data_dir / "index" / "tasks.sqlite3"),
            },
            data_dir / "logs" / "gateway.log",
            keeps=(api.fileno(),),
        ),
        *[
            Child(
                f"dispatcher-{i}",
                [
                    *exe,
                    "dispatcher",
                    "--metrics-fd",
                    str(metrics_sockets[i].fileno()),
                    "--drain-timeout",
                    str(DRAIN_SECONDS),
                ],
                {
                    **env,
                    **nats_auth.env_for("dispatcher", passwords, data_dir / "secrets"),
                    **scrape,
                },
                data_dir / "logs" / f"dispatcher-{i}.log",
                keeps=(metrics_sockets[i].fileno(),),
            )
            for i in range(dispatchers)
        ],
    ]
    for child in children:
        child.start()
    try:
        gateway_proc = children[0].proc
        assert gateway_proc is not None
        # The gateway is ready only once its task index has caught up with the records (quick
        # when it kept its index, longer the first time on many records), so readiness has no
        # fixed limit; a gateway that dies is reported at once.
        wait_until_ready(
            url,
            gateway_proc,
            lambda waited, why: print(
                f"  waiting for the gateway ({waited:.0f} s: {why})", flush=True
            ),
        )
        if manifests:
            client = Client(url, creds["adminToken"])
            for doc in manifests:
                client.apply(doc)
        # Written last: a client that finds the URL finds a platform ready for it.
        cfg = dict(creds, url=url, nats=f"nats://127.0.0.1:{nats_port}")
        private_files.write(client_config(data_dir), json.dumps(cfg, indent=2))
        print(f"kubetask dev is running (data in {data_dir})", flush=True)
        print(f"  API:     {url}   (OpenAPI: {url}/docs)", flush=True)
        print(f"  token:   {creds['token']}   (account 'default')", flush=True)
        print(f"  admin:   {creds['adminToken']}", flush=True)
        print(
            f"  NATS:    nats://127.0.0.1:{nats_port}   (users and passwords: "
            f"{data_dir / 'secrets' / 'nats-users.json'})",
            flush=True,
        )
        dispatcher_metrics = ", ".join(f"http://127.0.0.1:{p}/metrics" for p in metrics_ports)
        print(f"  metrics: {url}/metrics (gateway), {dispatcher_metrics} (dispatchers)", flush=True)
        print(
            f"           every series with 'Authorization: Bearer <{scrape_path}>'; an account's"
            " token shows its own",
            flush=True,
        )
        print(f"  users:   {FunctionUsers().describe()}", flush=True)
        print("  The CLI in this directory picks these up; Ctrl-C stops everything.", flush=True)
    except Exception as err:
        print(f"kubetask dev failed to start: {err}", file=sys.stderr, flush=True)
        for child in [nats, *children]:  # what the one that gave up said last
            if child.proc is not None and child.proc.poll() is not None:
                said = child.last_lines(3)
                print(f"  {child.name} ({child.log}):", *said, sep="\n    ", file=sys.stderr)
        _shutdown(children, nats)
        return 1

    stopping = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    wake = _wake_on_signals()
    everyone = [nats, *children]
    pending: dict[str, float] = {}  # child name -> when to restart it
    # Each pass looks before it sleeps: a child that died before SIGCHLD woke anything (while
    # the gateway was awaited) is restarted too, not waited for forever.
    while not stopping:
        now = time.monotonic()
        for child in everyone:
            if stopping or child.running():
                continue
            if child.name not in pending:
                assert child.proc is not None
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                # NATS first and fast: everything else waits for it.
                step = 0.1 if child is nats else 0.2
                delay = min(5.0, step * len(child.restarts))
                print(
                    f"{child.name} exited with code {child.proc.returncode}; "
                    f"restarting in {delay:g}s",
                    *child.last_lines(1),
                    sep="\n  ",
                    file=sys.stderr,
                    flush=True,
                )
                pending[child.name] = now + delay
            elif now >= pending[child.name]:
                del pending[child.name]
                child.start()
                print(f"{child.name} restarted", file=sys.stderr, flush=True)
        until = min(pending.values(), default=None)
        _sleep(wake, None if until is None else max(0.0, until - time.monotonic()))
    print("shutting down...", flush=True)
    _shutdown(children, nats)
    return 0


def _wake_on_signals() -> int:
    """A pipe every signal writes to (a child's exit, Ctrl-C): the supervisor sleeps on it
    rather than looking at its children twenty times a second, which cost an idle `kubetask
    dev` a quarter of a percent of a core (bench/idle.py)."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    return read


def _sleep(wake: int, timeout: float | None) -> None:
    """Until a signal (one that came since the last sleep counts) or `timeout` seconds."""
    select.select([wake], [], [], timeout)
    with contextlib.suppress(BlockingIOError):
        while os.read(wake, 512):
            pass


def _shutdown(children: list[Child], nats: Child) -> None:
    """Components first (they hand running attempts back through NATS), then NATS."""
    stop_all(children, STOP_SECONDS)
    stop_all([nats], 1.0)


def load_client_config(data_dir: Path) -> dict[str, str] | None:
    path = client_config(data_dir)
    if not path.exists():
        return None
    loaded: dict[str, str] = json.loads(path.read_text())
    return loaded
