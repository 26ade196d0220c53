"""A real Kubernetes node beside the e2e control plane: containerd with runc and the bridge CNI
plugin (Debian's packages, `install-node-packages.sh`), the kubelet and kube-proxy built from
the same Go module as kube-apiserver (`build-control-plane.sh`), kube-router's firewall
enforcing NetworkPolicies (`build-network-policy.sh`), and kubetask's images built without
Docker (`build_images.py`) and imported, never pulled.

What this VM needs, found by trying (the facts the executors issue lists): cgroup v1 with the
cgroupfs driver and no QoS cgroups, no negative oom_score_adj (containerd's
`restrict_oom_score_adj`), a sandbox image whose own command blocks, a node name that resolves
(`localhost`) and images imported under their full `docker.io/...` names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from controlplane import ControlPlane, spawn_logged, stop_all
from kubetask.embedded import free_port

HERE = Path(__file__).resolve().parent
POD_SUBNET = "10.244.0.0/24"
CNI_BIN = "/usr/lib/cni"
BRIDGE = "kt0"


def host_ip() -> str:
    """The address pods reach the host (and the API server) at: the one the default route
    leaves from."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("198.51.100.1", 9))  # no packet is sent: this only picks the route
        return str(s.getsockname()[0])


def _netns() -> set[str]:
    with contextlib.suppress(FileNotFoundError):
        return {p.name for p in Path("/var/run/netns").iterdir()}
    return set()


# `helm install` values for the chart on this node: the locally imported image for every pod
# (NATS included), never pulled, and NATS data in an emptyDir (no storage provisioner here).
CHART_VALUES = [
    "--set", "image.repository=docker.io/kubetask/kubetask", "--set", "image.tag=dev",
    "--set", "image.pullPolicy=Never",
    "--set", "nats.persistence.enabled=false",
    "--set", "nats.image.repository=docker.io/kubetask/kubetask", "--set", "nats.image.tag=dev",
]  # fmt: skip


def network_policy_binary() -> Path:
    """kube-router, built (or found in the cache)."""
    out = subprocess.run(
        ["bash", str(HERE / "build-network-policy.sh")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


# kube-router's firewall: its chains, and the jumps to them from the built-in ones.
KUBE_ROUTER_RULES = re.compile(r"KUBE-(ROUTER|POD-FW|NWPLCY)-|kube-router netpol")
KUBE_ROUTER_SETS = ("KUBE-SRC-", "KUBE-DST-", "kube-router-")


def _iptables_without(table: str, drop: Callable[[str], bool]) -> None:
    dump = subprocess.run(
        ["iptables-save", "-t", table], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    kept = [line for line in dump if not drop(line)]
    if len(kept) < len(dump):  # the whole table at once, without the dropped chains
        subprocess.run(["iptables-restore", "-w"], input="\n".join(kept) + "\n", text=True,
                       check=True, capture_output=True)  # fmt: skip


def _forget_network_rules() -> None:
    """What the node's network leaves in the host's iptables that no tool of its own takes
    back. kube-router's firewall, which names this run's pod addresses (the next run's pods get
    them again): its `--cleanup-config` crashes in v2.1.0, and would flush the host's IPVS
    tables besides. The bridge plugin's masquerade chain of each pod, removed by the plugin
    only when the pod is torn down, which a node killed at the end of its tests never does:
    1,054 rules were left after some dozens of runs."""
    _iptables_without("filter", lambda line: bool(KUBE_ROUTER_RULES.search(line)))
    sets = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout.split()
    for name in sets:
        if name.startswith(KUBE_ROUTER_SETS):
            subprocess.run(["ipset", "destroy", name], capture_output=True)
    nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    ours = {c for line in nat.splitlines() if "kubetask-e2e" in line
            for c in re.findall(r"CNI-[0-9a-f]+", line)}  # fmt: skip
    if ours:
        named = re.compile(rf"\b({'|'.join(ours)})\b")
        _iptables_without("nat", lambda line: bool(named.search(line)))


def images() -> Path:
    """The OCI archive of kubetask's images (built or found in the cache)."""
    subprocess.run(["bash", str(HERE / "install-node-packages.sh")], check=True)
    out = subprocess.run(
        [sys.executable, str(HERE / "build_images.py")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1]) / "images.tar"


@dataclass
class Node:
    cluster: ControlPlane
    root: Path
    address: str  # the host's, which pods reach: the API server's and the cluster DNS's
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    netns_before: set[str] = field(default_factory=set)

    @property
    def sock(self) -> Path:
        return self.root / "containerd.sock"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        return spawn_logged(self.root, name, argv, self.procs)

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", str(self.sock), "--namespace", "k8s.io", *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def start(self, archive: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # A bridge left by a run that was killed still holds its pods' addresses.
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        self.netns_before = _netns()
        self._start_containerd()
        self.ctr("images", "import", str(archive))
        self._start_dns()
        self._start_kubelet()
        self._start_kube_proxy()
        deadline = time.monotonic() + 120
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError((self.root / "kubelet.log").read_text()[-4000:])
            time.sleep(1)
        self._start_network_policies()  # it looks its node up once, at start
        time.sleep(1)  # one that cannot start has exited by then (below)
        for proc in self.procs:
            if proc.poll() is not None:
                name = Path(str(proc.args[0])).name
                raise RuntimeError((self.root / f"{name}.log").read_text()[-4000:])

    def _start_containerd(self) -> None:
        cni = self.root / "cni"
        cni.mkdir()
        (cni / "10-kubetask.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "kubetask-e2e",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": True,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(self.root / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                }
            )
        )
        config = self.root / "containerd.toml"
        config.write_text(
            textwrap.dedent(f"""\
            version = 2
            root = "{self.root / "containerd"}"
            state = "{self.root / "containerd-state"}"
            [grpc]
              address = "{self.sock}"
            [plugins."io.containerd.grpc.v1.cri"]
              sandbox_image = "docker.io/kubetask/pause:dev"
              restrict_oom_score_adj = true
              [plugins."io.containerd.grpc.v1.cri".cni]
                bin_dir = "{CNI_BIN}"
                conf_dir = "{cni}"
              [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
                runtime_type = "io.containerd.runc.v2"
            """)
        )
        proc = self._spawn("containerd", ["containerd", "--config", str(config)])
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.root / "containerd.log").read_text()[-3000:])
            time.sleep(0.2)

    def _start_kubelet(self) -> None:
        config = self.root / "kubelet.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "cgroupDriver": "cgroupfs",
                    "failCgroupV1": False,
                    "cgroupsPerQOS": False,
                    "enforceNodeAllocatable": [],
                    "failSwapOn": False,
                    "containerRuntimeEndpoint": f"unix://{self.sock}",
                    "port": free_port(),
                    "healthzPort": free_port(),
                    "readOnlyPort": 0,
                    # The API server reaches the kubelet for logs and exec; this node is on
                    # loopback and the VM's own address only.
                    "authentication": {
                        "anonymous": {"enabled": True},
                        "webhook": {"enabled": False},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "clusterDomain": "cluster.local",
                    "clusterDNS": [self.address],
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "serializeImagePulls": False,
                }
            )
        )
        self._spawn(
            "kubelet",
            [
                str(self.cluster.bin / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={self.cluster.kubeconfig}",
                "--hostname-override=localhost",
                f"--root-dir={self.root / 'kubelet'}",
                f"--cert-dir={self.root / 'kubelet-pki'}",
                "--v=1",
            ],
        )

    def _start_dns(self) -> None:
        """Cluster DNS: CoreDNS as a process of the node, on the address pods reach the host
        at (what the CoreDNS Deployment of a real cluster answers, from the same plugin)."""
        corefile = self.root / "Corefile"
        corefile.write_text(
            textwrap.dedent(f"""\
            .:53 {{
                bind {self.address}
                errors
                kubernetes cluster.local in-addr.arpa ip6.arpa {{
                    kubeconfig {self.cluster.kubeconfig} e2e
                    pods insecure
                    fallthrough in-addr.arpa ip6.arpa
                }}
                forward . /etc/resolv.conf
                cache 5
            }}
            """)
        )
        self._spawn("coredns", [str(self.cluster.bin / "coredns"), "-conf", str(corefile)])

    def _start_kube_proxy(self) -> None:
        self._spawn(
            "kube-proxy",
            [
                str(self.cluster.bin / "kube-proxy"),
                f"--kubeconfig={self.cluster.kubeconfig}",
                "--hostname-override=localhost",
                "--proxy-mode=iptables",
                "--cluster-cidr=10.244.0.0/16",
                # Replies between two pods on the bridge would bypass the host's conntrack.
                "--masquerade-all",
                "--conntrack-max-per-core=0",
                f"--healthz-bind-address=127.0.0.1:{free_port()}",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
            ],
        )

    def _start_network_policies(self) -> None:
        """A network plugin that enforces NetworkPolicies, as Calico or Cilium would: the bridge
        plugin stores them and lets everything through. kube-router's firewall only; pods'
        routes stay the bridge's and Services kube-proxy's. The bridge's traffic passes the
        host's iptables (`br_netfilter`), where kube-router filters it."""
        self._spawn(
            "kube-router",
            [
                str(network_policy_binary()),
                f"--kubeconfig={self.cluster.kubeconfig}",
                "--hostname-override=localhost",
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                "--enable-cni=false",
                "--enable-pod-egress=false",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--health-port=0",
            ],
        )

    def ready(self) -> bool:
        out = self.cluster.kubectl("get", "node", "localhost", "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def stop(self) -> None:
        """Everything the node started goes: its processes, the containers (their shims
        outlive containerd), then what they mounted under its root."""
        stop_all(self.procs)
        self._kill_shims()
        self._unmount()
        # Each sandbox's network namespace is pinned by a mount and outlives its processes,
        # its veth still on the bridge with the pod's address (the next run's pods got the
        # same addresses, and connections to them were refused).
        for name in _netns() - self.netns_before:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        subprocess.run([str(self.cluster.bin / "kube-proxy"), "--cleanup"], capture_output=True)
        _forget_network_rules()

    def _kill_shims(self) -> None:
        parents: dict[int, int] = {}
        shims = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"containerd-shim" in argv[0] and str(self.sock).encode() in argv:
                    shims.append(int(entry.name))
        doomed = set(shims)
        while grown := {pid for pid, ppid in parents.items() if ppid in doomed} - doomed:
            doomed |= grown
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _unmount(self) -> None:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        mine = [p for p in points if p.startswith(str(self.root) + os.sep)]
        for point in sorted(mine, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
