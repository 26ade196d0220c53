"""The Helm chart against the real API server: it lints, and installs every object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from controlplane import ControlPlane

CHART = str(Path(__file__).resolve().parents[1] / "charts" / "kubetask")
KUBE = ["--kube-version", "v1.34.4"]  # `helm template` renders for no cluster


@pytest.mark.parametrize("values", [[], ["--set", "nats.cluster.enabled=true"]])
def test_helm_lint_passes(cluster: ControlPlane, values: list[str]) -> None:
    out = cluster.run("helm", "lint", "--strict", CHART, *values)
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


@pytest.mark.parametrize(
    ("release", "nats_replicas", "values"),
    [
        ("single", 1, []),
        ("clustered", 3, ["--set", "nats.cluster.enabled=true"]),
    ],
)
def test_helm_install_creates_every_object(
    cluster: ControlPlane, release: str, nats_replicas: int, values: list[str]
) -> None:
    ns = f"kt-{release}"
    cluster.run("helm", "install", release, CHART, "--namespace", ns, "--create-namespace", *values)
    manifest = cluster.run("helm", "get", "manifest", release, "--namespace", ns).stdout
    kinds = sorted(
        line.split(": ", 1)[1] for line in manifest.splitlines() if line.startswith("kind: ")
    )
    assert kinds == sorted(
        [
            "ClusterRole",
            "ClusterRole",  # the dispatchers' (Jobs, with the kubernetes executor)
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",  # who reaches the NATS servers
            "Role",
            "RoleBinding",
            "Secret",
            "Secret",
            "Service",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceAccount",
            "ServiceAccount",
            "StatefulSet",
        ]
    )
    for doc in yaml.safe_load_all(manifest):
        if doc:  # every rendered object really is in the API server
            scope = [] if doc["kind"].startswith("Cluster") else ["-n", ns]
            cluster.kubectl("get", doc["kind"], doc["metadata"]["name"], *scope)
    sts = json.loads(
        cluster.kubectl(
            "get", "statefulset", f"{release}-kubetask-nats", "-n", ns, "-o", "json"
        ).stdout
    )
    assert sts["spec"]["replicas"] == nats_replicas
    cluster.kubectl("get", "clusterrole", f"{release}-kubetask-operator")
    for plural in ("taskfunctions", "asyncconfigs", "tasks"):
        cluster.kubectl("get", "crd", f"{plural}.kubetask.io")
    cluster.run("helm", "uninstall", release, "--namespace", ns)


def test_config_takes_only_kubetask_settings(cluster: ControlPlane) -> None:
    """`config` becomes the components' environment: anything but a KUBETASK_* name (a typo, or
    an attempt at PATH or the NATS password) is refused before anything is installed."""
    for bad in ("NATS_URL", "kubetask_lower", "KUBETASK_", "PATH"):
        refused = cluster.run(
            "helm", "template", "x", CHART, *KUBE, "--set", f"config.{bad}=1", check=False
        )
        assert refused.returncode != 0 and "is not a KUBETASK_* setting" in refused.stderr, bad
    made = cluster.run(
        "helm", "template", "x", CHART, *KUBE, "-s", "templates/config.yaml",
        "--set", "config.KUBETASK_ACCOUNT_MAX_BACKLOG=500",
    )  # fmt: skip
    assert yaml.safe_load(made.stdout)["data"] == {
        "KUBETASK_ACCOUNT_MAX_BACKLOG": "500",
        "KUBETASK_STORE_MAX_BYTES": str(10 << 30),  # nats.jetstream.maxFile
    }


def test_the_gateway_is_told_jetstreams_limit_as_nats_server_reads_it(
    cluster: ControlPlane,
) -> None:
    """Past 90% of it submissions are refused (`gateway/store_room.py`); untold, JetStream
    itself filled and then took no write. The figure is nats-server's own: its `G` is 10^9
    and its `Gi` 2^30, and it takes no fraction, so neither does the chart."""

    def rendered(*values: str) -> tuple[dict[str, str], str]:
        out = cluster.run("helm", "template", "x", CHART, *KUBE, *values).stdout
        docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
        nats_conf = docs["ConfigMap", "x-kubetask-nats"]["data"]["nats.conf"]
        return docs["ConfigMap", "x-kubetask-config"]["data"] or {}, nats_conf

    for size, expected in (("10Gi", 10 << 30), ("500M", 500_000_000), ("123456", 123456)):
        config, nats_conf = rendered("--set", f"nats.jetstream.maxFile={size}")
        assert config["KUBETASK_STORE_MAX_BYTES"] == str(expected), size
        assert f"max_file_store: {expected}\n" in nats_conf, size
    config, _ = rendered("--set", "config.KUBETASK_STORE_MAX_BYTES=1000")
    assert config["KUBETASK_STORE_MAX_BYTES"] == "1000"  # set by hand: kept
    config, _ = rendered("--set", "nats.cluster.enabled=true")
    assert "KUBETASK_STORE_MAX_BYTES" not in config  # each replica counted: by hand there
    for size in ("1.5Gi", "10GB", "lots"):
        refused = cluster.run(
            "helm", "template", "x", CHART, *KUBE, "--set", f"nats.jetstream.maxFile={size}",
            check=False,
        )  # fmt: skip
        assert refused.returncode != 0 and "is not a size" in refused.stderr, size


def test_a_token_for_a_reserved_namespace_is_refused(cluster: ControlPlane) -> None:
    """Accounts are namespaces: a token for the release's own namespace (its NATS passwords and
    the operator's service account) or a `kube-` one is refused before anything is installed."""
    for account in ("kt-home", "kube-system"):
        entry = {"name": "t", "account": account, "admin": False, "sha256": "ab" * 32}
        refused = cluster.run(
            "helm", "template", "x", CHART, *KUBE, "--namespace", "kt-home",
            "--set-json", f"auth.tokens={json.dumps([entry])}", check=False,
        )  # fmt: skip
        assert refused.returncode != 0 and "is reserved" in refused.stderr, refused.stderr
    fine = {"name": "t", "account": "team-a", "admin": False, "sha256": "ab" * 32}
    admin = {"name": "a", "admin": True, "sha256": "cd" * 32}
    cluster.run(
        "helm", "template", "x", CHART, *KUBE, "--namespace", "kt-home",
        "--set-json", f"auth.tokens={json.dumps([fine, admin])}",
    )  # fmt: skip
