"""The operator against the real API server and a real nats-server: TaskFunctions become queues,
Tasks applied with kubectl run once and report their phase, dispatchers scale with the backlog,
and a restarted operator changes nothing that was already right."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from controlplane import ControlPlane
from kubetask import names, nats_auth
from kubetask.embedded import free_port, start_nats
from nats.js.errors import KeyNotFoundError

NS = "kubetask"  # where the operator runs and owns its Deployments
ACCOUNT = "team-a"  # an account is a namespace
MAX_PAYLOAD = 4096
# The account's functions here take a few KB; one of 160 KB passes it alone.
MAX_REGISTERED_BYTES = 150_000
# About sixteen records of a payload near MAX_PAYLOAD (the least the setting takes); held to
# only while a gateway counts.
MAX_RECORD_BYTES = 64 << 10
# An account's registrations change at most this often, this many at once; no other test
# changes more than a few of team-a's.
MAX_CHANGES = 1
CHANGES_BURST = 6
SCRAPE_TOKEN = "e2e-metrics-token"


def eventually(check: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.3)


class Platform:
    def __init__(self, cluster: ControlPlane, root: Path) -> None:
        self.cluster = cluster
        self.root = root
        port = free_port()
        # NATS with the platform's users, as the chart runs it: the operator and the dispatcher
        # each connect as their own user, with only their permissions.
        self.passwords = nats_auth.load_or_create(root / "secrets" / "nats-users.json")
        conf = nats_auth.write_server_config(root / "secrets" / "nats.conf", self.passwords)
        self.nats = start_nats(root / "js", port, config=conf)
        self.nats_url = f"nats://127.0.0.1:{port}"
        self.operator: subprocess.Popen[bytes] | None = None
        self.dispatcher: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.env = dict(
            cluster.env(),
            KUBETASK_METRICS_TOKEN=SCRAPE_TOKEN,
            KUBETASK_NATS_URL=self.nats_url,
            KUBETASK_NAMESPACE=NS,
            KUBETASK_RELEASE="kt",
            KUBETASK_DISPATCHER_COOLDOWN="2",
            KUBETASK_SCALE_INTERVAL="0.5",
            KUBETASK_DISPATCHER_TARGET_BACKLOG="10",
            KUBETASK_DISPATCHER_MAX="5",
            KUBETASK_ACK_WAIT="5",
            KUBETASK_MAX_PAYLOAD=str(MAX_PAYLOAD),
            KUBETASK_ACCOUNT_MAX_RATE="1",
            KUBETASK_ACCOUNT_MAX_REGISTERED_BYTES=str(MAX_REGISTERED_BYTES),
            KUBETASK_ACCOUNT_MAX_RECORD_BYTES=str(MAX_RECORD_BYTES),
            KUBETASK_ACCOUNT_MAX_CHANGES=str(MAX_CHANGES),
            KUBETASK_ACCOUNT_CHANGES_BURST=str(CHANGES_BURST),
        )

    def _spawn(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        out = open(self.root / log, "ab")
        user = args[0]
        return subprocess.Popen(
            [sys.executable, "-m", "kubetask", *args],
            env={**self.env, **nats_auth.env_for(user, self.passwords, self.root / "secrets")},
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def start_operator(self) -> None:
        self.operator = self._spawn(
            "operator",
            "--all-namespaces",
            "--metrics-port",
            str(self.metrics_port),
            log="operator.log",
        )

    def scrape(self, token: str | None = SCRAPE_TOKEN) -> dict[str, float]:
        """The operator's /metrics: `name{label="value",...}` to value."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = httpx.get(url, headers=headers, timeout=10).text
        series = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                series[name] = float(value)
        return series

    def stop_operator(self) -> None:
        assert self.operator is not None
        self.operator.terminate()
        self.operator.wait(30)

    def start_dispatcher(self) -> None:
        self.dispatcher = self._spawn("dispatcher", log="dispatcher.log")

    def spawn_gateway(self) -> subprocess.Popen[bytes]:
        """A gateway that no client calls: it counts each account's records for the operator."""
        tokens = self.root / "tokens.json"
        tokens.write_text('{"tokens": []}')
        return self._spawn(
            "gateway", "--port", str(free_port()), "--tokens", str(tokens), log="gateway.log"
        )

    def stop(self) -> None:
        for proc in (self.operator, self.dispatcher, self.nats):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)

    def get(self, kind: str, name: str, ns: str = ACCOUNT) -> dict[str, Any] | None:
        out = self.cluster.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def ready(self, function: str) -> None:
        """Wait until the operator marks the TaskFunction ready."""
        eventually(
            lambda: (self.get("taskfunction", function) or {}).get("status", {}).get("ready"),
            30,
            f"{function} ready",
        )

    def task_in(self, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
        """The Task object once its status shows `phase`."""
        found: dict[str, Any] = eventually(
            lambda: (
                (t := self.get("task", name)) and t.get("status", {}).get("phase") == phase and t
            ),
            timeout,
            f"{name} {phase}",
        )
        return found

    def event_messages(self, ns: str, reason: str, name: str = "") -> list[str]:
        """What the events of `reason` in `ns` said, of objects whose name starts with `name`."""
        out = self.cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout
        return [
            e["message"]
            for e in json.loads(out)["items"]
            if e["reason"] == reason and e["involvedObject"]["name"].startswith(name)
        ]

    def apply(self, text: str) -> None:
        self.cluster.kubectl("apply", "-n", ACCOUNT, "-f", "-", stdin=textwrap.dedent(text))

    def js(self, call: Callable[[Any], Any]) -> Any:
        async def run() -> Any:
            nc = await nats.connect(self.nats_url, user="admin", password=self.passwords["admin"])
            try:
                return await call(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(run())


@pytest.fixture(scope="module")
def platform(crds: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    for ns in (NS, ACCOUNT):
        crds.kubectl("create", "namespace", ns)
    p = Platform(crds, tmp_path_factory.mktemp("platform"))
    p.start_operator()
    try:
        eventually(lambda: p.get("deployment", "kt-dispatcher", NS), 60, "operator Deployments")
        yield p
    finally:
        p.stop()
        print((p.root / "operator.log").read_text()[-4000:])


def _consumer_exists(p: Platform, stream: str, consumer: str) -> bool:
    async def check(js: Any) -> bool:
        try:
            await js.consumer_info(stream, consumer)
            return True
        except nats.js.errors.NotFoundError:
            return False

    return bool(p.js(check))


def _stream_exists(p: Platform, stream: str) -> bool:
    async def check(js: Any) -> bool:
        try:
            await js.stream_info(stream)
            return True
        except nats.js.errors.NotFoundError:
            return False

    return bool(p.js(check))


def test_operator_creates_and_owns_gateway_and_dispatcher(platform: Platform) -> None:
    gateway = platform.get("deployment", "kt-gateway", NS)
    dispatcher = platform.get("deployment", "kt-dispatcher", NS)
    assert gateway and dispatcher
    container = dispatcher["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "dispatcher"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert {"name": "KUBETASK_NATS_URL", "value": platform.nats_url} in container["env"]
    assert dispatcher["spec"]["replicas"] == 1


def test_taskfunction_gets_a_queue_and_ready_and_loses_it_on_delete(platform: Platform) -> None:
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {name: solo}
        spec: {command: ["true"], queueMode: dedicated, maxConcurrency: 2}
    """)
    fn = eventually(
        lambda: (
            (f := platform.get("taskfunction", "solo")) and f.get("status", {}).get("ready") and f
        ),
        30,
        "Ready",
    )
    assert fn["status"]["queue"] == "KT_QF_team-a_solo"
    assert fn["status"]["conditions"][0]["type"] == "Ready"
    assert _stream_exists(platform, "KT_QF_team-a_solo")
    assert _consumer_exists(platform, "KT_QF_team-a_solo", "fn_solo")
    platform.cluster.kubectl(
        "delete", "taskfunction", "solo", "-n", ACCOUNT, "--wait=true", "--timeout=60s"
    )
    assert not _stream_exists(platform, "KT_QF_team-a_solo")


def test_dispatcher_replicas_follow_the_backlog_up_and_down(platform: Platform) -> None:
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {name: bulk}
        spec: {command: ["true"]}
    """)
    eventually(lambda: _consumer_exists(platform, "KT_Q_team-a", "fn_bulk"), 30, "queue")

    async def inject(js: Any) -> None:  # no dispatcher runs yet: these stay pending
        for i in range(45):
            await js.publish(
                "kt.q.team-a.bulk", json.dumps({"a": ACCOUNT, "id": f"x{i}", "t": "0"}).encode()
            )

    platform.js(inject)
    replicas = lambda: platform.get("deployment", "kt-dispatcher", NS)["spec"]["replicas"]  # noqa: E731
    eventually(lambda: replicas() == 5, 30, "scale up to 5 (45 pending, 10 per replica, max 5)")
    seen = platform.scrape()
    assert seen["kubetask_operator_dispatchers_wanted"] == 5, seen
    assert seen["kubetask_operator_backlog"] >= 45, seen

    async def drain(js: Any) -> None:
        await js.purge_stream("KT_Q_team-a", subject="kt.q.team-a.bulk")

    platform.js(drain)
    eventually(lambda: replicas() == 1, 30, "scale back down to the minimum")
    assert platform.scrape()["kubetask_operator_dispatchers_wanted"] == 1


def test_taskfunction_deletion_waits_until_its_queue_is_drained(platform: Platform) -> None:
    async def inject(js: Any) -> None:
        for i in range(3):
            data = json.dumps({"a": ACCOUNT, "id": f"d{i}", "t": "0"}).encode()
            await js.publish("kt.q.team-a.bulk", data)

    platform.js(inject)
    platform.cluster.kubectl("delete", "taskfunction", "bulk", "-n", ACCOUNT, "--wait=false")
    time.sleep(3)
    held = platform.get("taskfunction", "bulk")
    assert held is not None and held["metadata"].get("deletionTimestamp")  # finalizer holds it
    assert _consumer_exists(platform, "KT_Q_team-a", "fn_bulk")

    async def drain(js: Any) -> None:
        await js.purge_stream("KT_Q_team-a", subject="kt.q.team-a.bulk")

    platform.js(drain)
    eventually(lambda: platform.get("taskfunction", "bulk") is None, 30, "deleted after drain")
    assert not _consumer_exists(platform, "KT_Q_team-a", "fn_bulk")


def test_task_applied_with_kubectl_runs_once_and_shows_its_phase(platform: Platform) -> None:
    marker = platform.root / "ran"
    script = platform.root / "report.py"
    script.write_text(
        "import json, sys\n"
        f"open({str(marker)!r}, 'a').write('x')\n"
        "print(json.dumps({'rows': json.load(sys.stdin)['rows'] * 2}))\n"
    )
    platform.apply(f"""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {{name: report}}
        spec: {{command: [{json.dumps(sys.executable)}, {json.dumps(str(script))}]}}
    """)
    platform.ready("report")
    platform.start_dispatcher()
    task_yaml = """
        apiVersion: kubetask.io/v1alpha1
        kind: Task
        metadata: {name: monthly-report}
        spec: {function: report, payload: {rows: 21}}
    """
    platform.apply(task_yaml)
    done = platform.task_in("monthly-report", "Succeeded", 60)
    assert done["status"]["attempts"] == 1
    assert json.loads(done["status"]["result"]) == {"rows": 42}
    assert done["status"]["timestamps"]["started"] and done["status"]["duration"]
    table = platform.cluster.kubectl("get", "tasks", "-n", ACCOUNT).stdout.splitlines()
    assert table[1].split()[:4] == ["monthly-report", "report", "Succeeded", "1"]
    events = platform.cluster.kubectl(
        "get", "events", "-n", ACCOUNT, "--field-selector", "involvedObject.name=monthly-report"
    ).stdout
    assert "Submitted" in events and "Succeeded" in events
    platform.apply(task_yaml)  # re-applying is not re-running
    time.sleep(2)
    assert marker.read_text() == "x"


def test_a_task_over_the_payload_limit_fails_saying_why(platform: Platform) -> None:
    """A kubectl-applied Task skipped the payload checks HTTP submissions get: one over the
    limit was queued and run, and one past what NATS takes was retried by the operator for
    ever, its object without a status."""
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {name: weigh}
        spec: {command: ["true"]}
    """)
    platform.ready("weigh")
    blob = json.dumps({"blob": "x" * MAX_PAYLOAD})
    platform.apply(f"""
        apiVersion: kubetask.io/v1alpha1
        kind: Task
        metadata: {{name: too-big}}
        spec: {{function: weigh, payload: {blob}}}
    """)
    done = platform.task_in("too-big", "Failed")
    error = done["status"]["error"]
    assert (
        error == f"refused: payload is {MAX_PAYLOAD + 11} bytes; the limit is {MAX_PAYLOAD} bytes"
    )
    assert done["status"]["attempts"] == 0
    events = platform.cluster.kubectl(
        "get", "events", "-n", ACCOUNT, "--field-selector", "involvedObject.name=too-big"
    ).stdout
    assert "Refused" in events, events


def test_tasks_applied_faster_than_the_account_may_submit_wait_their_turn(
    platform: Platform,
) -> None:
    """kubectl-applied Tasks skipped the back-pressure HTTP submissions get: an account could
    submit past its rate and its backlog limit through the API server. Here the account may
    submit one task a second (`KUBETASK_ACCOUNT_MAX_RATE` above)."""
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {name: paced}
        spec: {command: ["true"]}
    """)
    platform.ready("paced")
    if platform.dispatcher is None:
        platform.start_dispatcher()
    platform.apply(
        "\n---\n".join(
            f"""
        apiVersion: kubetask.io/v1alpha1
        kind: Task
        metadata: {{name: paced-{i}}}
        spec: {{function: paced}}
        """
            for i in range(4)
        )
    )

    def all_done() -> list[dict[str, Any]] | None:
        tasks = [platform.get("task", f"paced-{i}") or {} for i in range(4)]
        ok = all(t.get("status", {}).get("phase") == "Succeeded" for t in tasks)
        return tasks if ok else None

    done = eventually(all_done, 60, "all four Succeeded")
    submitted = sorted(datetime.fromisoformat(t["status"]["timestamps"]["submitted"]) for t in done)
    assert (submitted[-1] - submitted[0]).total_seconds() >= 2, submitted
    throttled = platform.event_messages(ACCOUNT, "Throttled", "paced-")
    assert throttled and "submits more than 1 tasks a second" in throttled[0], throttled
    seen = platform.scrape()
    refused = (
        'kubetask_submissions_throttled_total{account="team-a",function="paced",reason="rate"}'
    )
    assert seen.get(refused, 0) >= 1, seen
    assert seen.get('kubetask_operator_handled_total{kind="Task",outcome="retried"}', 0) >= 1
    assert seen.get('kubetask_operator_handled_total{kind="Task",outcome="done"}', 0) >= 4


def test_tasks_applied_past_the_accounts_record_quota_wait_and_its_neighbour_does_not(
    platform: Platform,
) -> None:
    """kubectl-applied Tasks were counted against the record quota but not held to it: an
    account could keep records past `KUBETASK_ACCOUNT_MAX_RECORD_BYTES` through the API server.
    The operator hears the gateways' counts (`record_reports.py`); here a gateway runs."""
    hoarder = "team-q"
    platform.cluster.kubectl("create", "namespace", hoarder)
    gateway = platform.spawn_gateway()
    try:
        fn = """
            apiVersion: kubetask.io/v1alpha1
            kind: TaskFunction
            metadata: {name: keep}
            spec: {command: ["true"]}
        """
        for ns in (hoarder, ACCOUNT):
            platform.cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=textwrap.dedent(fn))
            eventually(
                lambda ns=ns: (
                    (platform.get("taskfunction", "keep", ns) or {}).get("status", {}).get("ready")
                ),
                30,
                f"keep ready in {ns}",
            )
        if platform.dispatcher is None:
            platform.start_dispatcher()
        blob = json.dumps({"blob": "q" * (MAX_PAYLOAD - 100)})
        count = 22  # ~4.2 KB a record: the quota holds ~16
        tasks = "\n---\n".join(
            f"""
            apiVersion: kubetask.io/v1alpha1
            kind: Task
            metadata: {{name: hoard-{i}}}
            spec: {{function: keep, payload: {blob}}}
            """
            for i in range(count)
        )
        platform.cluster.kubectl("apply", "-n", hoarder, "-f", "-", stdin=textwrap.dedent(tasks))

        def refusals() -> list[str]:
            said = platform.event_messages(hoarder, "Throttled")
            return [m for m in said if "KUBETASK_ACCOUNT_MAX_RECORD_BYTES" in m]

        eventually(refusals, 60, "a Task held back by the record quota")

        def submitted() -> int:
            out = platform.cluster.kubectl("get", "tasks", "-n", hoarder, "-o", "json").stdout
            return sum(1 for t in json.loads(out)["items"] if t.get("status", {}).get("phase"))

        time.sleep(3)  # what was let through before the refusal has its status by now
        # Until a gateway says the account is near its quota, the operator takes it as
        # holding half (`record_reports.NEAR`): ~8 Tasks may go before the first refusal.
        assert 6 <= submitted() < count, submitted()
        platform.apply("""
            apiVersion: kubetask.io/v1alpha1
            kind: Task
            metadata: {name: neighbour-1}
            spec: {function: keep}
        """)
        platform.task_in("neighbour-1", "Succeeded", 60)
    finally:
        gateway.terminate()
        gateway.wait(30)


def test_a_task_applied_when_the_store_is_nearly_full_waits_unsubmitted(
    platform: Platform,
) -> None:
    """The gateway refuses submissions past 90% of `KUBETASK_STORE_MAX_BYTES` (507), but the
    operator submitted kubectl-applied Tasks whatever the room. Here the operator is told a
    limit JetStream already passed: the Task waits, unsubmitted, and its events say why."""
    platform.stop_operator()
    platform.env["KUBETASK_STORE_MAX_BYTES"] = "1024"
    platform.start_operator()
    try:
        platform.apply("""
            apiVersion: kubetask.io/v1alpha1
            kind: TaskFunction
            metadata: {name: roomless}
            spec: {command: ["true"]}
        """)
        platform.ready("roomless")
        platform.apply("""
            apiVersion: kubetask.io/v1alpha1
            kind: Task
            metadata: {name: roomless-1}
            spec: {function: roomless}
        """)

        said = eventually(
            lambda: platform.event_messages(ACCOUNT, "StoreFull", "roomless-1"),
            30,
            "roomless-1 held for room",
        )
        assert "the platform's storage is nearly full" in said[0], said
        assert "submitted in 60s" in said[0], said
        assert not (platform.get("task", "roomless-1") or {}).get("status", {}).get("phase")

        async def recorded(js: Any) -> bool:
            kv = await js.key_value(names.TASKS_BUCKET)
            try:
                await kv.get(names.task_key(ACCOUNT, "roomless-1"))
            except KeyNotFoundError:
                return False
            return True

        assert not platform.js(recorded)
    finally:
        platform.stop_operator()
        del platform.env["KUBETASK_STORE_MAX_BYTES"]
        platform.start_operator()


def test_taskfunctions_changed_faster_than_the_account_may_are_applied_in_turn(
    platform: Platform,
) -> None:
    """kubectl-applied TaskFunctions and AsyncConfigs skipped the change rate PUTs are held to
    (`gateway/change_rate.py`): each change gives the function new workers in every dispatcher,
    and one account re-registering as fast as it could slowed its neighbours' tasks. Past the
    rate the operator applies a change later, never drops it, and says why in the object's
    events; a neighbour's change is not held."""
    churn = "team-churn"
    platform.cluster.kubectl("create", "namespace", churn)

    def functions(value: str) -> str:
        return "\n---\n".join(
            f"""
            apiVersion: kubetask.io/v1alpha1
            kind: TaskFunction
            metadata: {{name: churn-{i}}}
            spec: {{command: ["true"], env: [{{name: V, value: "{value}"}}]}}
            """
            for i in range(CHANGES_BURST + 4)
        )

    def stored(value: str) -> Callable[[Any], Any]:
        async def check(js: Any) -> bool:
            kv = await js.key_value(names.FUNCTIONS_BUCKET)
            for i in range(CHANGES_BURST + 4):
                try:
                    fn = json.loads((await kv.get(f"{churn}.churn-{i}")).value)
                except KeyNotFoundError:
                    return False
                if fn["spec"]["env"] != [{"name": "V", "value": value}]:
                    return False
            return True

        return check

    def throttled(ns: str) -> list[str]:
        return platform.event_messages(ns, "Throttled")

    platform.cluster.kubectl("apply", "-n", churn, "-f", "-", stdin=textwrap.dedent(functions("1")))
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {name: calm}
        spec: {command: ["true"]}
    """)
    platform.ready("calm")  # while team-churn's wait their turn
    eventually(lambda: platform.js(stored("1")), 60, "every function registered")
    # Changed again at once: past the rate again, and the last change is the one that stays.
    platform.cluster.kubectl("apply", "-n", churn, "-f", "-", stdin=textwrap.dedent(functions("2")))
    eventually(lambda: platform.js(stored("2")), 60, "every change applied")
    messages = throttled(churn)
    assert messages and "KUBETASK_ACCOUNT_MAX_CHANGES" in messages[0], messages
    assert not [m for m in throttled(ACCOUNT) if "KUBETASK_ACCOUNT_MAX_CHANGES" in m]
    seen = platform.scrape()
    assert seen.get(f'kubetask_changes_throttled_total{{account="{churn}"}}', 0) >= 1, seen
    assert seen.get('kubetask_operator_handled_total{kind="TaskFunction",outcome="retried"}', 0)
    # Without the metrics token (the operator's port is reachable from tenants' pods), no
    # account's series: the platform's only.
    anonymous = platform.scrape(token=None)
    assert "kubetask_operator_dispatchers_wanted" in anonymous
    assert not [name for name in anonymous if "account=" in name], anonymous

    def caught_up() -> bool:
        for i in range(CHANGES_BURST + 4):
            fn = platform.get("taskfunction", f"churn-{i}", churn) or {}
            observed = fn.get("status", {}).get("observedGeneration")
            if observed != fn.get("metadata", {}).get("generation"):
                return False
        return True

    eventually(caught_up, 30, "each object's status caught up with its last change")
    # Deletions are changes too: they go in turn, and each ends.
    platform.cluster.kubectl(
        "delete", "taskfunctions", "--all", "-n", churn, "--wait=true", "--timeout=120s"
    )


def test_operator_restart_changes_nothing_that_was_right(platform: Platform) -> None:
    def versions() -> dict[str, Any]:
        """Every object's content; resourceVersion alone may move without a change of content
        (a re-asserted status only moves kopf's managedFields timestamp)."""
        out = {}
        for kind, name, ns in (
            ("taskfunction", "report", ACCOUNT),
            ("task", "monthly-report", ACCOUNT),
            ("deployment", "kt-gateway", NS),
            ("deployment", "kt-dispatcher", NS),
        ):
            obj = platform.get(kind, name, ns)
            assert obj is not None
            del obj["metadata"]["resourceVersion"]
            out[f"{kind}/{name}"] = obj
        return out

    # Settled first: the backlog timer may still have to record that the queue emptied.
    eventually(
        lambda: (
            (platform.get("taskfunction", "report") or {}).get("status", {}).get("backlog") == 0
        ),
        30,
        "backlog 0 recorded",
    )
    time.sleep(1)
    before = versions()
    platform.stop_operator()
    platform.start_operator()
    time.sleep(12)  # resume handlers, daemons and one backlog timer have run by now
    assert versions() == before
    assert (platform.root / "ran").read_text() == "x"


def test_async_config_is_bound_and_reaches_the_dispatchers_registry(platform: Platform) -> None:
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: report-cfg}
        spec: {function: report, maxAsyncRetryAttempts: 0}
    """)
    cfg = eventually(
        lambda: (
            (c := platform.get("asyncconfig", "report-cfg"))
            and c.get("status", {}).get("ready")
            and c
        ),
        30,
        "bound",
    )
    assert cfg["status"]["conditions"][0]["reason"] == "Bound"

    async def stored(js: Any) -> Any:
        kv = await js.key_value("kt_asyncconfigs")
        return json.loads((await kv.get(f"{ACCOUNT}.report-cfg")).value)

    assert platform.js(stored)["spec"]["maxAsyncRetryAttempts"] == 0
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: orphan-cfg}
        spec: {function: nobody}
    """)
    orphan = eventually(
        lambda: (
            (c := platform.get("asyncconfig", "orphan-cfg"))
            and c.get("status", {}).get("conditions")
            and c
        ),
        30,
        "status",
    )
    assert orphan["status"]["ready"] is False
    assert orphan["status"]["conditions"][0]["reason"] == "FunctionMissing"


def test_a_function_past_its_accounts_registered_bytes_says_so_and_is_not_registered(
    platform: Platform,
) -> None:
    """Every process mirrors every account's functions, so an account's are bounded in bytes
    (`quotas.py`; `MAX_REGISTERED_BYTES` above): the operator says why in the object's
    condition, as the API says 409, and stores nothing."""
    fat = {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": "fat"},
        # Two variables: one is at most 131,007 bytes (`grammar.VARIABLE_MAX_BYTES`).
        "spec": {
            "command": ["true"],
            "env": [{"name": f"BIG{i}", "value": "f" * 80_000} for i in range(2)],
        },
    }
    platform.cluster.kubectl("create", "-n", ACCOUNT, "-f", "-", stdin=json.dumps(fat))
    fn = eventually(
        lambda: (
            (f := platform.get("taskfunction", "fat"))
            and f.get("status", {}).get("conditions")
            and f
        ),
        30,
        "a condition",
    )
    [cond] = fn["status"]["conditions"]
    assert fn["status"]["ready"] is False and cond["reason"] == "OverQuota", cond
    assert "KUBETASK_ACCOUNT_MAX_REGISTERED_BYTES" in cond["message"], cond

    async def stored(js: Any) -> bool:
        kv = await js.key_value(names.FUNCTIONS_BUCKET)
        try:
            await kv.get(f"{ACCOUNT}.fat")
        except KeyNotFoundError:
            return False
        return True

    assert not platform.js(stored)
    platform.cluster.kubectl(
        "delete", "taskfunction", "fat", "-n", ACCOUNT, "--wait=true", "--timeout=60s"
    )


def test_deleting_a_task_object_stops_the_task(platform: Platform) -> None:
    pidfile = platform.root / "long.pid"
    script = platform.root / "long.py"
    script.write_text(
        f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    )
    platform.apply(f"""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {{name: long}}
        spec: {{command: [{json.dumps(sys.executable)}, {json.dumps(str(script))}]}}
    """)
    platform.ready("long")
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: Task
        metadata: {name: long-1}
        spec: {function: long}
    """)
    platform.task_in("long-1", "Running")
    pid = int(eventually(lambda: pidfile.exists() and pidfile.read_text(), 10, "pid"))
    platform.cluster.kubectl("delete", "task", "long-1", "-n", ACCOUNT, "--timeout=30s")
    assert (
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )

    async def phases(js: Any) -> list[str]:
        sub = await js.subscribe(
            f"kt.events.{ACCOUNT}.long-1", stream="KT_EVENTS", ordered_consumer=True
        )
        seen = []
        try:
            while True:
                msg = await sub.next_msg(timeout=1)
                if msg.data:
                    seen.append(json.loads(msg.data)["task"]["status"]["phase"])
        except (TimeoutError, nats.errors.TimeoutError):
            return seen

    assert platform.js(phases)[-2:] == ["Stopping", "Stopped"]  # then the record was deleted


def test_names_and_destinations_outside_the_grammar_are_refused(platform: Platform) -> None:
    """The API server itself refuses names with dots and subjects outside any `out.`
    namespace (the CRD's CEL rules); a subject in another account's namespace passes the schema,
    so the operator marks the AsyncConfig invalid and never registers it."""
    for bad in (
        """
        apiVersion: kubetask.io/v1alpha1
        kind: Task
        metadata: {name: a.b}
        spec: {function: solo}
        """,
        """
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: stealer}
        spec:
          function: solo
          destinationConfig: {onSuccess: {kind: subject, target: kt.ctl.stop.team-b.x}}
        """,
        """
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: spliced}
        spec:
          function: solo
          destinationConfig:
            onSuccess: {kind: webhook, target: "http://hooks.example/a b\\r\\nHost: x"}
        """,
        """
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: secret-in-url}
        spec:
          function: solo
          destinationConfig: {onSuccess: {kind: webhook, target: "http://u:p@hooks.example/"}}
        """,
        """
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {name: spliced-path}
        spec: {server: {command: [srv], invokePath: "/run now"}}
        """,
    ):
        refused = platform.cluster.kubectl(
            "apply", "-n", ACCOUNT, "-f", "-", stdin=textwrap.dedent(bad), check=False
        )
        assert refused.returncode != 0 and "Invalid" in refused.stderr, refused.stderr
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: hooked}
        spec:
          function: solo
          destinationConfig:
            onSuccess: {kind: webhook, target: "https://[fd00::1]:8443/hook?x=%20&y=1#f"}
    """)
    platform.apply("""
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: foreign}
        spec:
          function: solo
          destinationConfig: {onSuccess: {kind: subject, target: out.team-b.stolen}}
    """)
    cfg = eventually(
        lambda: (
            (c := platform.get("asyncconfig", "foreign"))
            and c.get("status", {}).get("conditions")
            and c
        ),
        30,
        "a condition",
    )
    assert cfg["status"]["ready"] is False
    assert cfg["status"]["conditions"][0]["reason"] == "InvalidSpec"
    assert "out.team-a." in cfg["status"]["conditions"][0]["message"]
