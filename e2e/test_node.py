"""On a real node (`node.py`: kubelet, containerd, runc, bridge CNI, kube-proxy, CoreDNS):
kubetask's image, built without Docker, runs as a pod that `kubectl logs` and `kubectl exec`
reach, and `helm install` brings every pod of the chart to Running and Ready — after which a
task submitted through the gateway's Service runs and succeeds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from controlplane import ControlPlane, binaries
from kubetask.auth import hash_token
from node import Node, host_ip, images

CHART = str(Path(__file__).resolve().parents[1] / "charts" / "kubetask")
IMAGE = ["--set", "image.repository=docker.io/kubetask/kubetask", "--set", "image.tag=dev"]


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
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


def test_helm_install_runs_every_pod_and_a_task_succeeds(node: Node, tmp_path: Path) -> None:
    cluster, ns = node.cluster, "kubetask"
    token = "kt_e2e-node-team-a-token"
    entry = {"name": "e2e", "account": "team-a", "admin": False, "sha256": hash_token(token)}
    cluster.run(
        "helm", "install", "kt", CHART, "--namespace", ns, "--create-namespace", *IMAGE,
        "--set", "image.pullPolicy=Never",
        # No storage provisioner on this node: NATS keeps its data in an emptyDir.
        "--set", "nats.persistence.enabled=false",
        "--set", "nats.image.repository=docker.io/kubetask/kubetask", "--set", "nats.image.tag=dev",
        "--set-json", f"auth.tokens={json.dumps([entry])}",
    )  # fmt: skip

    def all_ready() -> list[dict[str, Any]] | None:
        found = pods(cluster, ns)
        components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in found}
        wanted = {"nats", "operator", "gateway", "dispatcher"}
        return found if wanted <= components and all(map(ready, found)) else None

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

    service = json.loads(
        cluster.kubectl("get", "service", "kt-kubetask-gateway", "-n", ns, "-o", "json").stdout
    )
    base = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as api:
        made = api.put(
            "/v1/functions/hello",
            json={
                "apiVersion": "kubetask.io/v1alpha1",
                "kind": "TaskFunction",
                "metadata": {"name": "hello", "namespace": "team-a"},
                "spec": {"command": ["python3", "-c", "print('hello from a pod')"]},
            },
        )
        assert made.status_code == 200, made.text
        sent = api.post("/v1/tasks", json={"function": "hello", "payload": None})
        assert sent.status_code == 202, sent.text
        task_id = sent.json()["metadata"]["name"]

        def finished() -> dict[str, Any] | None:
            got = api.get(f"/v1/tasks/{task_id}").json()
            return got if got["status"]["phase"] in ("Succeeded", "Failed") else None

        done = eventually(finished, 60, "the task to finish")
    assert done["status"]["phase"] == "Succeeded", done
