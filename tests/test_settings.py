"""The settings reference (`kubetask settings`, docs/settings.md) against the code that reads
the settings: every variable a component reads is there with the default and range its reader
applies, and nothing is there that no component reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from kubetask.settings_reference import SECTIONS, markdown, read_all

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "operator" / "kubetask"
# Variables the platform sets for what it starts (a function, a pod's sidecar, the CLI's own),
# not settings an operator gives a component.
HANDED_ON = {
    "KUBETASK_TASK_ID", "KUBETASK_ATTEMPT", "KUBETASK_ACCOUNT", "KUBETASK_FUNCTION",
    "KUBETASK_TIMEOUT_SECONDS", "KUBETASK_CONCURRENCY", "KUBETASK_APP_PORT",
    "KUBETASK_PROXY_PORT", "KUBETASK_PROXY_TOKEN", "KUBETASK_INVOKE_PATH",
    "KUBETASK_READINESS_PATH", "KUBETASK_RUNTIME_URL", "KUBETASK_RUNTIME_TOKEN",
    "KUBETASK_POD_NAME", "KUBETASK_POD_NAMESPACE", "KUBETASK_NODE_NAME", "KUBETASK_POD_IP",
    "KUBETASK_CONTAINER_NAME", "KUBETASK_URL", "KUBETASK_TOKEN",
}  # fmt: skip


def test_the_reference_is_generated_from_the_code() -> None:
    path = ROOT / "docs" / "settings.md"
    assert path.read_text() == markdown(read_all()), (
        "docs/settings.md is stale: run `kubetask settings --markdown > docs/settings.md`"
    )


def test_every_setting_read_is_in_the_reference_and_nothing_else() -> None:
    """AIMD's seven settings, the acknowledgement wait and the publish de-duplication window
    were read by the components and written down nowhere a user would look."""
    known = read_all()
    described = [name for _, entries in SECTIONS for name, _ in entries]
    assert len(described) == len(set(described)), "a setting described twice"
    assert set(described) == set(known), set(described) ^ set(known)
    named = set()
    for source in PACKAGE.rglob("*.py"):
        named |= set(re.findall(r"\"(KUBETASK_[A-Z_]+)\"", source.read_text()))
    secrets = {f"{name}_FILE" for name, k in known.items() if k.secret}
    assert named - set(known) - secrets - HANDED_ON == set()


def test_the_command_shows_what_is_set_hides_secrets_and_names_a_bad_value(
    tmp_path: Path,
) -> None:
    def settings(**env: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASK_")}
        return subprocess.run(
            [sys.executable, "-m", "kubetask", "settings"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**clean, **env},
        )  # fmt: skip

    out = settings(KUBETASK_AIMD_START="12", KUBETASK_NATS_PASSWORD="hunter2")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line}
    assert lines["KUBETASK_AIMD_START"] == ["12", "8"]
    assert lines["KUBETASK_AIMD_DECREASE"] == ["-", "0.5"]
    assert lines["KUBETASK_NATS_PASSWORD"] == ["(set)", "-"]
    assert "hunter2" not in out.stdout
    bad = settings(KUBETASK_AIMD_DECREASE="2")
    assert bad.returncode == 2, bad.stdout
    assert "KUBETASK_AIMD_DECREASE='2': must be at most 0.99" in bad.stderr, bad.stderr
