"""A real Kubernetes control plane on 127.0.0.1 for tests: etcd and kube-apiserver (and, on
request, kube-controller-manager and kube-scheduler), built from Go modules by
`build-control-plane.sh` and started per test session — the envtest approach, no kubelet.

Authentication is a static token bound to `system:masters`; the kubeconfig written next to the
data points kubectl, helm and the operator at it.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubetask.embedded import free_port, wait_for_port
from kubetask.executors.parent_death import die_with_parent

HERE = Path(__file__).resolve().parent


def binaries() -> Path:
    """Build (or find in the cache) the control-plane binaries; returns their directory."""
    out = subprocess.run(
        ["bash", str(HERE / "build-control-plane.sh")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class ControlPlane:
    root: Path
    bin: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    token: str = "kubetask-e2e-admin"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        return spawn_logged(self.root, name, [str(self.bin / name), *args], self.procs)

    def start(self, controllers: bool = False, advertise: str = "127.0.0.1") -> None:
        """With a node, `advertise` is an address pods reach: the `kubernetes` Service's
        endpoint, which in-cluster clients (the operator) connect to."""
        self.root.mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd = self._spawn(
            "etcd",
            [
                "--data-dir",
                str(self.root / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
                "--log-level",
                "error",
            ],
        )
        wait_for_port(etcd_port, proc=etcd)
        sa_key = self.root / "sa.key"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True
        )
        tokens = self.root / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin,"system:masters"\n')
        api = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={'127.0.0.1' if advertise == '127.0.0.1' else '0.0.0.0'}",
                f"--advertise-address={advertise}",
                f"--secure-port={api_port}",
                f"--cert-dir={self.root / 'certs'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                f"--token-auth-file={tokens}",
                "--allow-privileged=true",
            ],
        )
        self.server = f"https://127.0.0.1:{api_port}"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: e2e, cluster: {{server: '{self.server}', "
            "insecure-skip-tls-verify: true}}]\n"
            f"users: [{{name: admin, user: {{token: {self.token}}}}}]\n"
            "contexts: [{name: e2e, context: {cluster: e2e, user: admin, namespace: default}}]\n"
            "current-context: e2e\n"
        )
        deadline = time.monotonic() + 90
        while self.kubectl("get", "--raw", "/readyz", check=False).returncode != 0:
            if api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.root / "kube-apiserver.log").read_text()[-3000:])
            time.sleep(0.5)
        if controllers:
            self.start_controllers(sa_key)

    def start_controllers(self, sa_key: Path) -> None:
        ca = self.root / "certs" / "apiserver.crt"
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={ca}",
                "--use-service-account-credentials=false",
                "--controllers=*",
                f"--cert-dir={self.root / 'kcm-certs'}",
                "--secure-port=0",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0"],
        )

    def env(self) -> dict[str, str]:
        return dict(
            os.environ, KUBECONFIG=str(self.kubeconfig), PATH=f"{self.bin}:{os.environ['PATH']}"
        )

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, check=check, stdin=stdin)

    def run(
        self, tool: str, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin / tool), *args],
            env=self.env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def stop(self) -> None:
        stop_all(self.procs)


def spawn_logged(
    root: Path, name: str, argv: list[str], procs: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """Start a process of the tier, its output in `root/<name>.log`; it dies with the test
    process (a run killed or ended by a timeout leaves none behind)."""
    log = open(root / f"{name}.log", "ab")
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent()
    )
    procs.append(proc)
    return proc


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Last started, first stopped; killed when a polite stop takes too long."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
