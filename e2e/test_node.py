"""On a real node (`node.py`: kubelet, containerd, runc, bridge CNI, kube-proxy, CoreDNS,
kube-router's NetworkPolicy firewall):
kubetask's image, built without Docker, runs as a pod that `kubectl logs` and `kubectl exec`
reach, and `helm install` brings every pod of the chart to Running and Ready — after which a
task submitted through the gateway's Service runs and succeeds."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from controlplane import ControlPlane, binaries
from kubetask import names
from kubetask.auth import hash_token
from kubetask.executors.pod_template import APP_PORT, FUNCTION_CONTAINER, PROXY_PORT
from node import CHART_VALUES, Node, host_ip, images

CHART = str(Path(__file__).resolve().parents[1] / "charts" / "kubetask")
MAX_BACKLOG = 4321


def eventually(check: Callable[[], Any], timeout: float, what: str | Callable[[], str]) -> Any:
    """`what` may be a callable, to say what was seen last when the wait times out."""
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out waiting for {said}")
        time.sleep(1)
    return got


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A control plane of its own (with controllers, advertised where pods reach it) and a
    node registered to it."""
    archive = images()
    address = host_ip()
    root = tmp_path_factory.mktemp("node")
    cluster = ControlPlane(root / "k8s", binaries())
    node = Node(cluster, root / "node", address)
    try:
        cluster.start(controllers=True, advertise=address)
        node.start(archive)
        yield node
    finally:
        node.stop()
        cluster.stop()


def pods(cluster: ControlPlane, ns: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", "pods", "-n", ns, "-o", "json"] + (["-l", selector] if selector else [])
    return list(json.loads(cluster.kubectl(*args).stdout)["items"])


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_the_image_runs_as_a_pod_that_logs_and_exec_reach(node: Node) -> None:
    cluster = node.cluster
    cluster.kubectl(
        "run", "probe", "--image=docker.io/kubetask/kubetask:dev", "--image-pull-policy=Never",
        "--restart=Never", "--command", "--",
        "sh", "-c", "python3 -m kubetask --help >/dev/null && echo kubetask-ok; sleep 600",
    )  # fmt: skip
    eventually(lambda: ready(pods(cluster, "default")[0]), 60, "the pod to be Ready")
    eventually(lambda: "kubetask-ok" in cluster.kubectl("logs", "probe").stdout, 30, "its log")
    assert cluster.kubectl("exec", "probe", "--", "hostname").stdout.strip() == "probe"
    cluster.kubectl("delete", "pod", "probe", "--grace-period=0", "--force")


@pytest.mark.parametrize(
    ("release", "nats_pods"), [("single", 1), ("clustered", 3)], ids=["nats", "nats-cluster"]
)
def test_helm_install_runs_every_pod_and_tasks_succeed(
    node: Node, release: str, nats_pods: int
) -> None:
    """Clustered, every stream is kept on three servers: deleting a NATS pod while a task runs
    (its replacement starts empty) loses neither that task nor the next one."""
    cluster, ns = node.cluster, f"kt-{release}"
    token = f"kt_e2e-node-{release}-token"
    entry = {"name": "e2e", "account": "team-a", "admin": False, "sha256": hash_token(token)}
    cluster.run(
        "helm", "install", release, CHART, "--namespace", ns, "--create-namespace", *CHART_VALUES,
        "--set", f"nats.cluster.enabled={str(nats_pods > 1).lower()}",
        "--set", f"config.KUBETASK_ACCOUNT_MAX_BACKLOG={MAX_BACKLOG}",
        "--set-json", f"auth.tokens={json.dumps([entry])}",
    )  # fmt: skip
    try:
        chart_runs(cluster, ns, nats_pods)
        # The account's functions run as Jobs in its namespace.
        account = "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a}\n"
        cluster.kubectl("apply", "-f", "-", stdin=account)
        gateway = json.loads(
            cluster.kubectl(
                "get", "service", f"{release}-kubetask-gateway", "-n", ns, "-o", "json"
            ).stdout
        )["spec"]
        base = f"http://{gateway['clusterIP']}:{gateway['ports'][0]['port']}"
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as api:
            function(api, "hello", ["python3", "-c", "print('hello from a pod')"])
            assert finish(api, submit(api, "hello"))["status"]["phase"] == "Succeeded"
            # The chart's `config` reached the gateway the operator made.
            assert api.get("/v1/limits").json()["maxBacklog"] == MAX_BACKLOG
            assert stream_replicas(cluster, ns, release) == {
                f"KV_{names.TASKS_BUCKET}": nats_pods,
                names.account_stream("team-a"): nats_pods,
            }
            if nats_pods == 1:
                a_tenants_pod_reaches_no_nats_port(cluster, ns, release)
                function_pods_take_connections_on_the_proxy_port_only(cluster)
                a_neighbour_reaches_a_function_pod_on_its_proxy_port_only(cluster, api)
                no_function_runs_in_the_platforms_namespace(cluster, ns, release)
                a_function_applied_with_kubectl_runs_as_a_job(cluster, api)
                a_function_cannot_write_raw_frames(api)
                a_function_cannot_reach_the_metadata_service(cluster, api)
                logs_in_to_the_pod_running_a_task(cluster, api, ns, base, token, release)
                a_deleted_executor_pod_costs_one_attempt(cluster, api)
                an_image_that_is_not_there_fails_the_attempt_at_once(cluster, api)
                a_result_past_its_limit_ends_the_pod_at_once(api)
                a_pod_printing_past_its_pace_waits_and_loses_nothing(api)
                a_server_function_scales_from_zero_to_its_demand_and_back(cluster, api)
                a_changed_config_rolls_the_gateway(cluster, api, ns, release)
            if nats_pods > 1:
                a_server_without_the_routes_password_cannot_join(cluster, ns, release)
                function(api, "slow", ["sleep", "5"])
                running = submit(api, "slow")
                eventually(lambda: phase(api, running) == "Running", 60, "the slow task to run")
                cluster.kubectl("delete", "pod", "-n", ns, f"{release}-kubetask-nats-1")
                after = submit(api, "hello")
                assert finish(api, running)["status"]["phase"] == "Succeeded"
                assert finish(api, after)["status"]["phase"] == "Succeeded"
                chart_runs(cluster, ns, nats_pods)  # the deleted server is back and ready
    finally:
        cluster.run("helm", "uninstall", release, "--namespace", ns, check=False)


def nats_pod_ip(cluster: ControlPlane, ns: str, release: str) -> str:
    pod = cluster.kubectl("get", "pod", "-n", ns, f"{release}-kubetask-nats-0", "-o", "json")
    return str(json.loads(pod.stdout)["status"]["podIP"])


def a_tenants_pod_reaches_no_nats_port(cluster: ControlPlane, ns: str, release: str) -> None:
    """Enforced (this node's kube-router): a pod in an account's namespace reaches neither the
    NATS client port (credentials guard it, and now the network too) nor the monitoring port,
    whose pages answer anyone with every account's streams and consumers; the platform's own
    pods still do (every later step runs through them)."""
    address = nats_pod_ip(cluster, ns, release)
    cluster.kubectl(
        "run", "tenant", "-n", "team-a", "--image=docker.io/kubetask/kubetask:dev",
        "--image-pull-policy=Never", "--restart=Never", "--command", "--", "sleep", "600",
    )  # fmt: skip
    try:
        eventually(lambda: ready(pods(cluster, "team-a", "run=tenant")[0]), 60, "the pod Ready")

        def connect(port: int) -> str:
            argv = ["exec", "-n", "team-a", "tenant", "--", "python3", "-c", CONNECT]
            return str(cluster.kubectl(*argv, address, str(port)).stdout.strip())

        for port in (4222, 8222):
            eventually(lambda p=port: connect(p) != "connected", 30, f"NATS port {port} refused")
    finally:
        cluster.kubectl("delete", "pod", "tenant", "-n", "team-a", "--grace-period=0",
                        "--force", check=False)  # fmt: skip


def a_server_without_the_routes_password_cannot_join(
    cluster: ControlPlane, ns: str, release: str
) -> None:
    """A process that reached a server's route port joined the cluster as one of its servers,
    and was sent every message (seen with two nats-servers, 2026-12-04). Asked from this node,
    which the NetworkPolicy lets through (as it does the kubelet's probes): the route port asks
    for credentials and refuses a server without them."""
    with socket.create_connection((nats_pod_ip(cluster, ns, release), 6222), timeout=10) as s:
        reader = s.makefile("rb")
        info = json.loads(reader.readline().split(b" ", 1)[1])
        assert info.get("auth_required") is True, info
        hello = {"verbose": False, "pedantic": False, "name": "rogue", "headers": True,
                 "cluster": info.get("cluster", ""), "user": "", "pass": ""}  # fmt: skip
        s.sendall(b"CONNECT " + json.dumps(hello).encode() + b"\r\nPING\r\n")
        answer = reader.readline()
        assert answer.startswith(b"-ERR 'Authorization Violation'"), answer


def function_pods_take_connections_on_the_proxy_port_only(cluster: ControlPlane) -> None:
    """The account's NetworkPolicy, made once it has a function and brought back in line when
    edited (what it lets through: the next step)."""
    proxy_only = [{"ports": [{"protocol": "TCP", "port": PROXY_PORT}]}]

    def ingress() -> Any:
        got = cluster.kubectl(
            "get", "networkpolicy", "kubetask-functions", "-n", "team-a", "-o", "json",
            check=False,
        )  # fmt: skip
        return got.returncode == 0 and json.loads(got.stdout)["spec"].get("ingress")

    assert eventually(ingress, 30, "the account's network policy") == proxy_only
    spec = json.loads(
        cluster.kubectl("get", "networkpolicy", "kubetask-functions", "-n", "team-a",
                        "-o", "json").stdout
    )["spec"]  # fmt: skip
    assert spec["policyTypes"] == ["Ingress", "Egress"]  # what egress lets: a later step
    assert spec["podSelector"] == {
        "matchExpressions": [{"key": "kubetask.io/function", "operator": "Exists"}]
    }
    cluster.kubectl(
        "patch", "networkpolicy", "kubetask-functions", "-n", "team-a", "--type=merge",
        "-p", json.dumps({"spec": {"ingress": [{}]}}),  # every connection
    )  # fmt: skip
    eventually(lambda: ingress() == proxy_only, 30, "the policy to be brought back in line")


# Prints how a TCP connection to argv[1]:argv[2] went, within 3 s.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except socket.timeout:
    print("timed out")
except OSError as err:
    print(type(err).__name__)
"""


def a_neighbour_reaches_a_function_pod_on_its_proxy_port_only(
    cluster: ControlPlane, api: httpx.Client
) -> None:
    """Enforced (this node's kube-router): a warm pod whose server binds every address, as most
    frameworks in a container do, answers on its own pod address from inside, but a pod of
    another namespace reaches only the proxy (whose token guards invocations), not the server."""
    function(
        api, "open",
        server={"command": ["python3", "-c", SERVER], "concurrency": 1, "maxInstances": 1},
        env=[{"name": "BIND", "value": "0.0.0.0"}],
    )  # fmt: skip
    cluster.kubectl(
        "run", "neighbour", "-n", "default", "--image=docker.io/kubetask/kubetask:dev",
        "--image-pull-policy=Never", "--restart=Never", "--command", "--", "sleep", "600",
    )  # fmt: skip
    try:
        assert finish(api, submit(api, "open"))["status"]["phase"] == "Succeeded"
        (pod,) = pods(cluster, "team-a", "kubetask.io/function=open")  # idle, not yet stopped
        address, name = pod["status"]["podIP"], pod["metadata"]["name"]
        eventually(
            lambda: ready(pods(cluster, "default", "run=neighbour")[0]), 60, "the neighbour Ready"
        )

        def connect(where: list[str], port: int) -> str:
            argv = ["exec", *where, "--", "python3", "-c", CONNECT, address, str(port)]
            return str(cluster.kubectl(*argv).stdout.strip())

        inside = ["-n", "team-a", name, "-c", FUNCTION_CONTAINER]
        assert connect(inside, APP_PORT) == "connected"  # the server is there, on every address
        neighbour = ["-n", "default", "neighbour"]
        assert connect(neighbour, PROXY_PORT) == "connected"
        # The network plugin applies the policy to a new pod within moments, not at once.
        eventually(lambda: connect(neighbour, APP_PORT) != "connected", 30, "the server refused")
    finally:
        cluster.kubectl("delete", "pod", "neighbour", "-n", "default", "--grace-period=0",
                        "--force", check=False)  # fmt: skip
        assert api.delete("/v1/functions/open").status_code == 204


def no_function_runs_in_the_platforms_namespace(
    cluster: ControlPlane, ns: str, release: str
) -> None:
    """Functions applied in the platform's own namespace (an admin's slip: a token for it would
    do the same) asking for its NATS passwords and the operator's service account, and in
    Kubernetes' `kube-public`: every attempt fails saying why, and no Job, warm Deployment or
    NetworkPolicy is made there."""
    for where, why in ((ns, "is the platform's own namespace"),
                       ("kube-public", "is a Kubernetes system namespace")):  # fmt: skip
        cluster.kubectl(
            "apply", "-n", where, "-f", "-",
            stdin=f"""apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {{name: intruder}}
spec:
  command: [sh, -c, env]
  envFrom: [{{secretRef: {{name: {release}-kubetask-nats-users, optional: true}}}}]
  serviceAccountName: {release}-kubetask-operator
---
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {{name: intruder-warm}}
spec:
  server: {{command: [python3, -m, http.server]}}
---
apiVersion: kubetask.io/v1alpha1
kind: Task
metadata: {{name: intrude}}
spec: {{function: intruder}}
---
apiVersion: kubetask.io/v1alpha1
kind: Task
metadata: {{name: intrude-warm}}
spec: {{function: intruder-warm}}
""",
        )  # fmt: skip

        def ended(task: str) -> dict[str, Any] | None:
            got = cluster.kubectl("get", "task", task, "-n", where, "-o", "json", check=False)  # noqa: B023
            status = json.loads(got.stdout).get("status", {}) if got.returncode == 0 else {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        for task in ("intrude", "intrude-warm"):
            status = eventually(lambda: ended(task), 90, f"task {task} to end")  # noqa: B023
            assert status["phase"] == "Failed", status
            assert why in status["error"], status
        time.sleep(6)  # the operator's warm pods and policies passes (1 s, 5 s) have been by
        for kind, selector in (
            ("jobs", "kubetask.io/function"), ("deployments", "kubetask.io/warm=true"),
            ("networkpolicies", "kubetask.io/policy"),
        ):  # fmt: skip
            made = cluster.kubectl("get", kind, "-n", where, "-l", selector, "-o", "name").stdout
            assert not made.strip(), made
        cluster.kubectl("delete", "-n", where, "tasks,taskfunctions", "--all", "--wait=false")


def job_pods(
    cluster: ControlPlane, task_id: str, attempt: int | None = None
) -> list[dict[str, Any]]:
    selector = f"kubetask.io/task={task_id}" + (
        f",kubetask.io/attempt={attempt}" if attempt else ""
    )
    return pods(cluster, "team-a", selector)


def a_function_applied_with_kubectl_runs_as_a_job(cluster: ControlPlane, api: httpx.Client) -> None:
    """TaskFunction and Task applied with kubectl: a Job in the account's namespace runs the
    function's image (here kubetask's own, named explicitly) with the sidecar beside it; its
    output reaches `kubetask logs` (through the dispatcher) and `kubectl logs` (the container's
    own streams); the Job is the function's, retries nothing itself and cleans up after."""
    cluster.kubectl(
        "apply", "-n", "team-a", "-f", "-",
        stdin="""apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {name: doubler}
spec:
  image: docker.io/kubetask/kubetask:dev
  imagePullPolicy: Never
  command: [python3, -c, "import json,sys,os; n=json.load(sys.stdin)['number']; print('doubling', n, 'in', os.environ['KUBETASK_TASK_ID'], file=sys.stderr); print(json.dumps(2*n))"]
  env: [{name: GREETING, value: hi}]
  resources: {requests: {cpu: 10m, memory: 32Mi}, limits: {memory: 128Mi}}
  timeoutSeconds: 120
---
apiVersion: kubetask.io/v1alpha1
kind: Task
metadata: {name: double-21}
spec: {function: doubler, payload: {number: 21}}
""",
    )  # fmt: skip
    eventually(lambda: phase(api, "double-21"), 60, "the operator to submit the Task")
    done = finish(api, "double-21")
    assert done["status"]["phase"] == "Succeeded", done
    assert done["status"]["result"] == 42
    executor = done["status"]["executor"]
    assert executor["backend"] == "kubernetes" and executor["namespace"] == "team-a"
    eventually(
        lambda: "Succeeded" in cluster.kubectl("get", "tasks", "-n", "team-a", "double-21").stdout,
        30, "kubectl get tasks to show it Succeeded",
    )  # fmt: skip
    (job,) = json.loads(
        cluster.kubectl(
            "get", "jobs", "-n", "team-a", "-l", "kubetask.io/task=double-21", "-o", "json"
        ).stdout
    )["items"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] >= 120
    assert spec["ttlSecondsAfterFinished"] > 0
    assert job["metadata"]["labels"]["kubetask.io/function"] == "doubler"
    assert job["metadata"]["labels"]["kubetask.io/account"] == "team-a"
    (owner,) = job["metadata"]["ownerReferences"]
    fn_uid = json.loads(
        cluster.kubectl("get", "taskfunction", "doubler", "-n", "team-a", "-o", "json").stdout
    )["metadata"]["uid"]
    assert (owner["kind"], owner["uid"]) == ("TaskFunction", fn_uid)
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["memory"] == "128Mi"
    assert {"name": "GREETING", "value": "hi"} in container["env"]
    assert pod["automountServiceAccountToken"] is False

    def container_log() -> str | None:
        """Once the kubelet has reported the container (it may answer `PodInitializing` for a
        moment after the task has already ended)."""
        got = cluster.kubectl(
            "logs", "-n", "team-a", f"job/{job['metadata']['name']}", "-c", "function", check=False
        )
        return got.stdout if got.returncode == 0 else None

    logs = eventually(container_log, 30, "kubectl logs of the Job's function container")
    assert "doubling 21 in double-21" in logs and "42" in logs
    said = [json.loads(line) for line in api.get("/v1/tasks/double-21/logs").text.splitlines()]
    assert any(
        r.get("stream") == "stderr" and r.get("line") == "doubling 21 in double-21" for r in said
    ), said
    # Deleting the function deletes its Jobs (they are its own).
    cluster.kubectl("delete", "taskfunction", "doubler", "-n", "team-a", "--timeout=60s")
    eventually(
        lambda: not cluster.kubectl("get", "jobs", "-n", "team-a", "-l", "kubetask.io/function=doubler", "-o", "name").stdout.strip(),
        60, "the function's Jobs to be deleted with it",
    )  # fmt: skip


def logs_in_to_the_pod_running_a_task(
    cluster: ControlPlane, api: httpx.Client, ns: str, base: str, token: str, release: str
) -> None:
    """`kubetask login <task-id> -- hostname` runs in the pod the task runs in (its Job's),
    `describe` and `kubectl get tasks -o wide` name that pod, and what the sidecar holds
    reaches neither NATS nor any other attempt."""
    function(api, "held", ["sleep", "600"])
    cluster.kubectl(
        "apply", "-n", "team-a", "-f", "-",
        stdin="apiVersion: kubetask.io/v1alpha1\nkind: Task\n"
        "metadata: {name: held-1}\nspec: {function: held}\n",
    )  # fmt: skip
    eventually(lambda: phase(api, "held-1") == "Running", 60, "the task to run")
    (pod,) = eventually(lambda: job_pods(cluster, "held-1"), 30, "the task's pod")
    name = pod["metadata"]["name"]

    def placed() -> dict[str, Any] | None:
        executor: dict[str, Any] = api.get("/v1/tasks/held-1").json()["status"]["executor"]
        return executor if executor.get("pod") else None

    executor = eventually(placed, 60, "the task's record to name its pod")
    assert executor["pod"] == name and executor["namespace"] == "team-a"
    assert executor["node"] == "localhost" and executor["container"] == "function"

    def kubetask(*args: str) -> str:
        """The CLI as a user of the cluster runs it: the API and token from the environment."""
        env = {**cluster.env(), "KUBETASK_URL": base, "KUBETASK_TOKEN": token}
        done = subprocess.run(
            [sys.executable, "-m", "kubetask", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    kubectl = str(cluster.bin / "kubectl")
    assert kubetask("login", "held-1", "--kubectl", kubectl, "--", "hostname").strip() == name
    described = kubetask("describe", "held-1")
    assert f"pod team-a/{name} on node localhost" in described, described
    a_sidecar_reaches_nothing_but_its_attempt(cluster, pod, ns, release)
    function(
        api, "talker", ["python3", "-c", "import sys; print('said in a pod', file=sys.stderr)"]
    )
    said = submit(api, "talker")
    finish(api, said)
    assert "[1 stderr] said in a pod" in kubetask("logs", said)  # the same command as locally

    def wide() -> list[str] | None:
        out = cluster.kubectl("get", "tasks", "-n", "team-a", "-o", "wide").stdout.splitlines()
        row = [line for line in out if line.startswith("held-1 ")]
        return [out[0], row[0]] if row and name in row[0] else None

    table = eventually(wide, 30, "kubectl get tasks -o wide to show the pod")
    assert table[0].split()[-2:] == ["POD", "NODE"] and table[1].split()[-2:] == [name, "localhost"]
    # Deleting the object stops the task (the operator's finalizer), which deletes its Job.
    cluster.kubectl("delete", "task", "held-1", "-n", "team-a", "--timeout=60s")
    assert phase(api, "held-1") is None
    eventually(lambda: not job_pods(cluster, "held-1"), 60, "the stopped task's pod to go")


def a_sidecar_reaches_nothing_but_its_attempt(
    cluster: ControlPlane, pod: dict[str, Any], ns: str, release: str
) -> None:
    """An executor pod holds no NATS credentials and no service-account token; the one secret
    its sidecar has (the attempt's token) is refused by NATS under any user, and the runtime
    endpoint answers it with that attempt's payload and nothing else."""
    spec = pod["spec"]
    assert spec.get("automountServiceAccountToken") is False
    containers = [*spec["initContainers"], *spec["containers"]]
    env = {e["name"]: e for c in containers for e in c.get("env", [])}
    assert not [n for n in env if n.startswith("KUBETASK_NATS")]
    assert not [e for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})]
    assert not any("envFrom" in c for c in containers)
    assert {m["name"] for c in containers for m in c.get("volumeMounts", [])} == {"kt-runtime"}
    token = env["KUBETASK_RUNTIME_TOKEN"]["value"]
    url = env["KUBETASK_RUNTIME_URL"]["value"]
    assert "KUBETASK_RUNTIME_TOKEN" not in {e["name"] for e in spec["containers"][0].get("env", [])}
    nats_ip = json.loads(
        cluster.kubectl("get", "service", f"{release}-kubetask-nats", "-n", ns, "-o", "json").stdout
    )["spec"]["clusterIP"]

    async def refused(user: str | None) -> bool:
        try:
            nc = await nats.connect(
                f"nats://{nats_ip}:4222", user=user, password=token if user else None,
                allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5,
            )  # fmt: skip
        except Exception:
            return True
        await nc.close()
        return False

    for user in (None, "gateway", "dispatcher", "operator", "admin", "destinations", "sidecar"):
        assert asyncio.run(refused(user)), user
    with httpx.Client(base_url=url, timeout=10) as rt:
        mine = rt.post(
            "/v1/run/start",
            json={"pod": pod["metadata"]["name"], "namespace": "team-a"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert mine.status_code == 200 and mine.json() is None  # held-1's payload
        other = rt.post(
            "/v1/run/start",
            json={"pod": pod["metadata"]["name"], "namespace": "team-a"},
            headers={"Authorization": f"Bearer {token[:-2]}xy"},
        )
        assert other.status_code == 404


def a_deleted_executor_pod_costs_one_attempt(cluster: ControlPlane, api: httpx.Client) -> None:
    """`kubectl delete pod` of the pod running a task: that attempt fails (its pod was
    stopped), and the next one, in a new Job, succeeds."""
    function(api, "retried", ["sh", "-c", '[ "$KUBETASK_ATTEMPT" -gt 1 ] || exec sleep 600'])
    task_id = submit(api, "retried")
    eventually(lambda: phase(api, task_id) == "Running", 60, "the task to run")
    (pod,) = eventually(lambda: job_pods(cluster, task_id, 1), 60, "its pod")
    eventually(lambda: ready(job_pods(cluster, task_id, 1)[0]), 60, "its pod to run")
    cluster.kubectl("delete", "pod", "-n", "team-a", pod["metadata"]["name"], "--wait=false")
    done = finish(api, task_id)
    assert done["status"]["phase"] == "Succeeded", done
    assert done["status"]["attempts"] == 2
    assert done["status"]["executor"]["pod"] != pod["metadata"]["name"]
    logs = api.get(f"/v1/tasks/{task_id}/logs").text
    assert "stopped (deleted or evicted)" in logs, logs


# Run as root in its container (the image names no user), as most images' functions are.
RAW_FRAMES = """
import json, os, socket
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
    raw = "opened"
except PermissionError:
    raw = "refused"
print(json.dumps({"uid": os.getuid(), "raw": raw}))
"""


# Every second for 20 s, how a connection to each of argv[1:] (host:port) went, within 1 s.
DIAL_REPEATEDLY = """
import json, socket, sys, time
seen = {t: [] for t in sys.argv[1:]}
for _ in range(20):
    for target in seen:
        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            seen[target].append("connected")
        except OSError as err:
            seen[target].append(type(err).__name__)
    time.sleep(1)
print(json.dumps(seen))
"""
METADATA_LIKE = "169.254.77.77"  # link-local, as the clouds' metadata service is


def a_function_cannot_reach_the_metadata_service(cluster: ControlPlane, api: httpx.Client) -> None:
    """A function pod's egress is closed to the denied networks (by default link-local, where
    the clouds' metadata service hands out the node's credentials), and open elsewhere: an
    address of the host's in 169.254.0.0/16, which a pod no policy selects reaches, and the
    host's own."""
    subprocess.run(["ip", "addr", "add", f"{METADATA_LIKE}/32", "dev", "lo"], check=True)
    server = socket.create_server(("0.0.0.0", 0))
    port = server.getsockname()[1]
    server.listen(64)
    cluster.kubectl(
        "run", "unselected", "-n", "default", "--image=docker.io/kubetask/kubetask:dev",
        "--image-pull-policy=Never", "--restart=Never", "--command", "--", "sleep", "600",
    )  # fmt: skip
    try:
        targets = [f"{METADATA_LIKE}:{port}", f"{host_ip()}:{port}"]
        function(api, "metadata", ["python3", "-c", DIAL_REPEATEDLY, *targets])
        done = finish(api, submit(api, "metadata"))
        assert done["status"]["phase"] == "Succeeded", done["status"]
        denied, host = (done["status"]["result"][t] for t in targets)
        assert host[-1] == "connected", host
        # The network plugin applies the policy to a new pod within moments, not at once.
        blocked = [i for i, outcome in enumerate(denied) if outcome != "connected"]
        assert blocked and "connected" not in denied[blocked[0] :], denied
        eventually(lambda: ready(pods(cluster, "default", "run=unselected")[0]), 60, "a pod Ready")
        argv = ["exec", "-n", "default", "unselected", "--", "python3", "-c", CONNECT]
        reached = cluster.kubectl(*argv, METADATA_LIKE, str(port)).stdout.strip()
        assert reached == "connected", "the address is reachable: the policy is what refuses"
    finally:
        cluster.kubectl("delete", "pod", "unselected", "-n", "default", "--grace-period=0",
                        "--force", check=False)  # fmt: skip
        server.close()
        subprocess.run(["ip", "addr", "del", f"{METADATA_LIKE}/32", "dev", "lo"], check=False)


def a_function_cannot_write_raw_frames(api: httpx.Client) -> None:
    """A raw packet socket on the pod's interface is how a tenant would forge a neighbour's
    ARP or DNS answers on the node's bridge (`pod_template.function_container`)."""
    function(api, "frames", ["python3", "-c", RAW_FRAMES])
    done = finish(api, submit(api, "frames"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["result"] == {"uid": 0, "raw": "refused"}, done["status"]["result"]


def a_result_past_its_limit_ends_the_pod_at_once(api: httpx.Client) -> None:
    """A pod whose result passed its limit ran on until its timeout (here 600 s, past
    `finish`'s 90 s): the attempt has failed then, and its pod is deleted at once."""
    endless = "import sys, time; print('y' * 300_000, flush=True); time.sleep(600)"
    for kind, spec in (
        ("functions", {"command": ["python3", "-c", endless], "timeoutSeconds": 600}),
        ("asyncconfigs", {"function": "endless", "maxAsyncRetryAttempts": 0}),
    ):
        made = api.put(
            f"/v1/{kind}/endless",
            json={
                "apiVersion": "kubetask.io/v1alpha1",
                "kind": "TaskFunction" if kind == "functions" else "AsyncConfig",
                "metadata": {"name": "endless", "namespace": "team-a"},
                "spec": spec,
            },
        )
        assert made.status_code == 200, made.text
    done = finish(api, submit(api, "endless"))
    assert done["status"]["phase"] == "Failed", done["status"]
    assert done["status"]["error"].startswith("result exceeds "), done["status"]["error"][:200]


def a_pod_printing_past_its_pace_waits_and_loses_nothing(api: httpx.Client) -> None:
    """5 MB of stderr at once, read at the account's pace (256 KiB/s): the sidecar sent all it
    gathered while an answer was held, past the 4 MiB a request may hold, and the attempt was
    lost. The sidecar now stops reading, and the function's writes wait."""
    flood = (
        "import sys; [print('line', i, 'x' * 990, file=sys.stderr) for i in range(5000)]; "
        "print(5000)"
    )
    function(api, "flood", ["python3", "-c", flood])
    task_id = submit(api, "flood")
    done = finish(api, task_id)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["result"] == 5000
    logs = api.get(f"/v1/tasks/{task_id}/logs").text
    assert "line 4999 " in logs and "dropped" not in logs, logs[-500:]


def an_image_that_is_not_there_fails_the_attempt_at_once(
    cluster: ControlPlane, api: httpx.Client
) -> None:
    """An image the node cannot have (never pulled, not present): the attempt fails saying so,
    long before the pod start timeout, and its Job is gone."""
    made = api.put(
        "/v1/functions/ghost",
        json={
            "apiVersion": "kubetask.io/v1alpha1", "kind": "TaskFunction",
            "metadata": {"name": "ghost", "namespace": "team-a"},
            "spec": {"command": ["true"], "image": "docker.io/kubetask/not-there:dev", "imagePullPolicy": "Never"},
        },
    )  # fmt: skip
    assert made.status_code == 200, made.text
    config = api.put(
        "/v1/asyncconfigs/ghost",
        json={
            "apiVersion": "kubetask.io/v1alpha1", "kind": "AsyncConfig",
            "metadata": {"name": "ghost", "namespace": "team-a"},
            "spec": {"function": "ghost", "maxAsyncRetryAttempts": 0},
        },
    )  # fmt: skip
    assert config.status_code == 200, config.text
    started = time.monotonic()
    done = finish(api, submit(api, "ghost"))
    assert done["status"]["phase"] == "Failed"
    assert "ErrImageNeverPull" in done["status"]["error"], done["status"]["error"]
    assert time.monotonic() - started < 60
    assert not cluster.kubectl(
        "get", "jobs", "-n", "team-a", "-l", "kubetask.io/function=ghost", "-o", "name"
    ).stdout.strip()


SERVER = """
import http.server, json, os, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null") or {}
        print("serving", self.headers["X-Kubetask-Task-Id"], flush=True)
        time.sleep(body.get("sleep", 0))
        out = json.dumps({"pod": os.environ["HOSTNAME"]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args): pass
bind = os.environ.get("BIND", "127.0.0.1")
http.server.ThreadingHTTPServer((bind, int(os.environ["PORT"])), H).serve_forever()
"""


def warm_replicas(cluster: ControlPlane) -> tuple[int, int]:
    """(replicas wanted, pods of the warm Deployment that exist)."""
    got = cluster.kubectl("get", "deployment", "kt-warm", "-n", "team-a", "-o", "json", check=False)
    if got.returncode:
        return -1, 0
    spec = json.loads(got.stdout)["spec"]
    return int(spec.get("replicas") or 0), len(pods(cluster, "team-a", "kubetask.io/function=warm"))


def a_server_function_scales_from_zero_to_its_demand_and_back(
    cluster: ControlPlane, api: httpx.Client
) -> None:
    """A `server` function: its Deployment waits at zero, wakes on the first task, grows with a
    500-task backlog to its maxInstances, serves each task once, and goes back to zero when
    idle; pods taken away while their tasks run finish those tasks first (none lost, none run
    twice: every task ends Succeeded at its first attempt). Nine running tasks on pods of four
    slots each: every pod serves some when two of them are taken away."""
    function(
        api, "warm",
        server={"command": ["python3", "-c", SERVER], "concurrency": 4, "maxInstances": 3, "idleSeconds": 5},
        maxConcurrency=12, timeoutSeconds=60,
    )  # fmt: skip
    eventually(lambda: warm_replicas(cluster) == (0, 0), 60, "the warm Deployment at zero")
    first = submit(api, "warm", {"sleep": 0})
    assert finish(api, first)["status"]["phase"] == "Succeeded"
    # What the server printed while it served the task is that task's log.
    said = [json.loads(line) for line in api.get(f"/v1/tasks/{first}/logs").text.splitlines()]
    assert {"stream": "instance", "line": f"serving {first}"}.items() <= next(
        (r for r in said if r.get("stream") == "instance"), {}
    ).items(), said
    ids = [submit(api, "warm", {"sleep": 0.2}) for _ in range(500)]
    peak = 0
    while any(phase(api, i) not in ("Succeeded", "Failed") for i in ids[-20:]):
        peak = max(peak, warm_replicas(cluster)[1])
        time.sleep(0.5)
    done = [finish(api, i) for i in ids]
    assert {d["status"]["phase"] for d in done} == {"Succeeded"}
    again = [d["metadata"]["name"] for d in done if d["status"]["attempts"] != 1]
    for i in again[:3]:
        print(api.get(f"/v1/tasks/{i}/logs").text)
    assert not again, f"{len(again)} tasks took more than one attempt"
    served = {d["status"]["result"]["pod"] for d in done}
    assert peak == 3 and len(served) == 3, (peak, served)
    eventually(lambda: warm_replicas(cluster) == (0, 0), 90, "the idle function back at zero")

    # Pods taken away while they serve: they drain, and nothing they ran is lost or repeated.
    slow = [submit(api, "warm", {"sleep": 10}) for _ in range(12)]
    eventually(lambda: warm_replicas(cluster)[1] == 3, 60, "three warm pods")
    # Serving on two pods or more, so that scaling to one takes a pod with work away whichever
    # it keeps. Counted from the records, which name the pod: a function that idled probes from
    # its AIMD window's start (8), so a count of tasks Running says nothing about where.
    seen: list[set[str]] = [set()]

    def serving() -> bool:
        seen[0] = pods_serving(api, slow)
        return len(seen[0]) >= 2

    def last() -> str:
        return f"tasks on two pods or more (last: {seen[0]}, {[phase(api, i) for i in slow]})"

    eventually(serving, 60, last)
    cluster.kubectl("scale", "deployment", "kt-warm", "-n", "team-a", "--replicas=1")
    done = [finish(api, i) for i in slow]
    assert {d["status"]["phase"] for d in done} == {"Succeeded"}, done
    assert {d["status"]["attempts"] for d in done} == {1}


def a_changed_config_rolls_the_gateway(
    cluster: ControlPlane, api: httpx.Client, ns: str, release: str
) -> None:
    """`helm upgrade` with another setting: the operator restarts (its pod's checksum moved) and
    rolls the gateway it made, which then answers with the new limit."""
    cluster.run(
        "helm", "upgrade", release, CHART, "--namespace", ns, "--reuse-values",
        "--set", f"config.KUBETASK_ACCOUNT_MAX_BACKLOG={MAX_BACKLOG + 1}",
    )  # fmt: skip

    def limit() -> int | None:
        try:
            return int(api.get("/v1/limits").json()["maxBacklog"])
        except (httpx.TransportError, ValueError, KeyError):  # a gateway being replaced
            return None

    eventually(lambda: limit() == MAX_BACKLOG + 1, 120, "the gateway to take the new setting")


def stream_replicas(cluster: ControlPlane, ns: str, release: str) -> dict[str, int]:
    """How many servers hold the task records and the account's queue, asked of NATS itself
    (through its Service, as the platform's admin)."""
    secret = json.loads(
        cluster.kubectl(
            "get", "secret", f"{release}-kubetask-nats-users", "-n", ns, "-o", "json"
        ).stdout
    )["data"]
    nats_ip = json.loads(
        cluster.kubectl("get", "service", f"{release}-kubetask-nats", "-n", ns, "-o", "json").stdout
    )["spec"]["clusterIP"]

    async def ask() -> dict[str, int]:
        nc = await nats.connect(
            f"nats://{nats_ip}:4222",
            user="admin",
            password=base64.b64decode(secret["admin"]).decode(),
        )
        try:
            js = nc.jetstream()
            found: dict[str, int] = {}
            for stream in (f"KV_{names.TASKS_BUCKET}", names.account_stream("team-a")):
                info = await js.stream_info(stream)
                found[stream] = 1 + len((info.cluster and info.cluster.replicas) or [])
            return found
        finally:
            await nc.close()

    return asyncio.run(ask())


def chart_runs(cluster: ControlPlane, ns: str, nats_pods: int) -> None:
    def all_ready() -> list[dict[str, Any]] | None:
        found = pods(cluster, ns)
        components = [p["metadata"]["labels"].get("app.kubernetes.io/component") for p in found]
        wanted = {"nats", "operator", "gateway", "dispatcher"}
        enough = wanted <= set(components) and components.count("nats") == nats_pods
        return found if enough and all(map(ready, found)) else None

    try:
        running = eventually(all_ready, 240, "every pod of the chart Running and Ready")
    except AssertionError:
        print(cluster.kubectl("get", "pods", "-A", "-o", "wide").stdout)
        for pod in pods(cluster, ns):
            if not ready(pod):
                name = pod["metadata"]["name"]
                for previous in ("--previous", ""):
                    out = cluster.kubectl("logs", "-n", ns, name, previous, check=False)
                    print(name, previous, out.stdout[-3000:], out.stderr[-500:])
        raise
    assert {p["status"]["phase"] for p in running} == {"Running"}


def function(api: httpx.Client, name: str, command: list[str] | None = None, **spec: Any) -> None:
    """A function of team-a's: `command`, or whatever `spec` says (a `server`, say)."""
    made = api.put(
        f"/v1/functions/{name}",
        json={
            "apiVersion": "kubetask.io/v1alpha1",
            "kind": "TaskFunction",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": spec if command is None else {"command": command, **spec},
        },
    )
    assert made.status_code == 200, made.text


def submit(api: httpx.Client, name: str, payload: Any = None) -> str:
    sent = api.post("/v1/tasks", json={"function": name, "payload": payload})
    assert sent.status_code == 202, sent.text
    return str(sent.json()["metadata"]["name"])


def pods_serving(api: httpx.Client, ids: list[str]) -> set[str]:
    """The pods that the tasks still Running are placed on (a warm pod names itself on the
    record once an invocation outlasts a moment)."""
    found = set()
    for task_id in ids:
        status = api.get(f"/v1/tasks/{task_id}").json()["status"]
        pod = (status.get("executor") or {}).get("pod")
        if status["phase"] == "Running" and pod:
            found.add(pod)
    return found


def phase(api: httpx.Client, task_id: str) -> str | None:
    """None until the task exists (one applied with kubectl is submitted by the operator)."""
    got = api.get(f"/v1/tasks/{task_id}")
    return None if got.status_code == 404 else str(got.json()["status"]["phase"])


def finish(api: httpx.Client, task_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        got: dict[str, Any] = api.get(f"/v1/tasks/{task_id}").json()
        return got if got["status"]["phase"] in ("Succeeded", "Failed") else None

    return dict(eventually(finished, 90, f"task {task_id} to finish"))
