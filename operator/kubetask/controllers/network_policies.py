"""Each account's function pods take connections on their proxy's port only: a NetworkPolicy
in every account namespace with functions (the kubernetes executor).

A warm pod's proxy takes invocations only with its Deployment's token, but the function's own
server listens beside it in the same pod (`$PORT`), and a server that binds every address (most
frameworks in a container do) could be reached at the pod's address by any pod of the cluster,
another tenant's included, and invoked with no token at all: what `executors/instance_ports.py`
closes on one host. An attempt's pod (a Job) takes no connections at all, and whatever its
command listens on is as reachable. The policy selects every pod of a function
(`kubetask.io/function`) and lets in connections to the proxy's port alone; the dispatchers
reach the proxies there, the kubelet's probes and `kubectl exec` (`kubetask login`) do not go
through it.

The same policy lets the pods connect anywhere but the networks no function may reach
(`executors/function_egress.py`: by default the clouds' metadata service, which hands out the
node's credentials).

A NetworkPolicy is enforced by the cluster's network plugin (Calico, Cilium, Antrea...); one
without support (flannel alone, the reference `bridge` plugin) stores it and lets everything
through, as Kubernetes documents. Policies allow together: one of the cluster's that lets more
in to these pods does. Made once an account has a function, brought back in line if edited,
and left in place after (it selects only kubetask's pods).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .. import kube_client, reserved_namespaces
from ..executors.function_egress import denied_networks
from ..executors.pod_template import PROXY_PORT
from ..networks import Network
from ..plane import DataPlane
from .kube import differs

log = logging.getLogger("kubetask.operator.policies")

NAME = "kubetask-functions"
LABEL = "kubetask.io/policy"
INTERVAL = 5.0


def policy(account: str, denied: tuple[Network, ...] = ()) -> dict[str, Any]:
    """With `denied` networks, the pods may connect anywhere else (`function_egress.py`): to
    every pod of the cluster, and to every address outside those networks."""
    body: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NAME,
            "namespace": account,
            "labels": {"app.kubernetes.io/managed-by": "kubetask", LABEL: "functions"},
        },
        "spec": {
            "podSelector": {
                "matchExpressions": [{"key": "kubetask.io/function", "operator": "Exists"}]
            },
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": PROXY_PORT}]}],
        },
    }
    if denied:
        blocks = [
            {"ipBlock": {"cidr": whole, "except": [str(n) for n in denied if n.version == v]}}
            for v, whole in ((4, "0.0.0.0/0"), (6, "::/0"))
        ]
        body["spec"]["policyTypes"].append("Egress")
        # Whether an ipBlock matches pods' own addresses is the plugin's choice: they are let
        # through by name, so a pod reaches the cluster's DNS and services wherever it runs.
        body["spec"]["egress"] = [{"to": [{"namespaceSelector": {}}, *blocks]}]
    return body


def _existing() -> dict[str, Any]:
    """Our policies, by namespace, as the API server holds them."""
    kube_client.load()
    found = client.NetworkingV1Api().list_network_policy_for_all_namespaces(
        label_selector=f"{LABEL}=functions"
    )
    api = client.ApiClient()
    items: list[Any] = list(found.items)
    return {
        p.metadata.namespace: api.sanitize_for_serialization(p)  # type: ignore[no-untyped-call]
        for p in items
        if p.metadata.name == NAME
    }


def _apply(accounts: set[str], warned: set[str], denied: tuple[Network, ...]) -> None:
    """`warned`: accounts whose policy could not be made, said once (a function may be
    registered over HTTP for an account whose namespace does not exist yet)."""
    existing = _existing()
    net = client.NetworkingV1Api()
    for account in sorted(accounts):
        body = policy(account, denied)
        have = existing.get(account)
        try:
            if have is None:
                net.create_namespaced_network_policy(account, body)  # type: ignore[arg-type]
                log.info("account %s: its function pods take connections on port %d only",
                         account, PROXY_PORT)  # fmt: skip
            elif differs(body["spec"], have.get("spec")):
                net.patch_namespaced_network_policy(NAME, account, {"spec": body["spec"]})
            warned.discard(account)
        except ApiException as err:
            if err.status != 409 and account not in warned:  # 409: made meanwhile
                warned.add(account)
                log.warning("account %s: no network policy (%s)", account, err.reason)


async def keep_forever(plane: DataPlane, platform: str) -> None:
    """`platform`: the platform's namespace, which like Kubernetes' own gets no policy: no
    function's pod runs there (`reserved_namespaces.py`)."""
    warned: set[str] = set()
    denied = denied_networks()  # a setting: read once
    while True:
        accounts = {
            fn.account
            for fn in list(plane.registry.functions.values())
            if reserved_namespaces.refusal(fn.account, platform) is None
        }
        try:
            await asyncio.to_thread(_apply, accounts, warned, denied)
        except Exception:
            log.exception("network policies pass failed")
        await asyncio.sleep(INTERVAL)
