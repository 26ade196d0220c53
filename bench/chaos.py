"""Tasks submitted while `kill -9` and SIGSTOP hit the platform's processes at random: afterwards every
accepted task must have reached a terminal state (or still be waiting its turn), once, with
the attempts its retry policy allows.

`kubetask dev` with two dispatchers (and whatever KUBETASK_* variables it is run with, e.g.
KUBETASK_FUNCTION_USERS=accounts as root); four submitters post a mix (a quick command, a warm
server, a one-second command, a command that always fails with two retries) at ~100 tasks/s
each for `--seconds`, while every 1.5-4 s nats-server, the gateway or a dispatcher is killed
(`kubetask dev` restarts it) or, a `--freezes` share of the time, stopped for 2-10 s and then
let go on (it comes back to find its work taken over). A submission answered 202 (or 409: an
earlier try got in) is accepted; one that got no answer (in progress at a gateway that was
killed) may or may not exist, and must have ended too if it does. Prints what was accepted,
refused, killed and stopped, then each function's outcomes by phase and attempts, any task
that did not end, and any that ran more often than its attempts say (the commands note each
run). Asserts nothing.

Run: .venv/bin/python bench/chaos.py [--seconds 120] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from devrun import Dev, children, running_dev

HERE = Path(__file__).resolve().parent
TERMINAL = {"Succeeded", "Failed", "Expired", "Stopped"}
RETRIES = 2  # of the failing function


def functions(runs: Path) -> list[tuple[str, dict[str, object]]]:
    """Each function's name and spec (how a task of it should end: `expected`). The commands
    note each run of a task in `runs`, to be held against its attempts."""
    sh = ["sh", "-c"]
    note = f"cat >/dev/null; echo run >> {runs}/$KUBETASK_TASK_ID"
    return [
        ("quick", {"command": [*sh, f"{note}; echo '{{\"ok\": 1}}'"], "maxConcurrency": 8}),
        (
            "warm",
            {
                "server": {
                    # The standard library's server, on the host's python3: with
                    # KUBETASK_FUNCTION_USERS=accounts an account's user runs it, and may not
                    # reach every interpreter (one under /root, a venv's packages).
                    "command": ["python3", str(HERE.parent / "examples" / "warm_server.py")],
                    "concurrency": 8,
                    "maxInstances": 2,
                },
                "maxConcurrency": 16,
            },
        ),
        ("slow", {"command": [*sh, f"{note}; sleep 1"], "maxConcurrency": 8}),
        ("failing", {"command": [*sh, "exit 3"]}),
    ]


def expected(function: str, phase: str, attempts: int) -> bool:
    if function == "failing":
        return phase == "Failed" and attempts == RETRIES + 1
    return phase == "Succeeded"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def component(command: str) -> str | None:
    for name, mark in (
        ("nats", "nats-server"),
        ("gateway", " gateway "),
        ("dispatcher", " dispatcher "),
    ):
        if mark in command:
            return name
    return None


async def setup(http: httpx.AsyncClient, runs: Path) -> None:
    for name, spec in functions(runs):
        body = {"apiVersion": "kubetask.io/v1alpha1", "kind": "TaskFunction"}
        body |= {"metadata": {"name": name}, "spec": {"timeoutSeconds": 30, **spec}}
        (await http.put(f"/v1/functions/{name}", json=body)).raise_for_status()
    config = {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "AsyncConfig",
        "metadata": {"name": "failing"},
        "spec": {
            "function": "failing",
            "maxAsyncRetryAttempts": RETRIES,
            "retryBackoff": {"initialSeconds": 1, "multiplier": 2},
        },
    }
    (await http.put("/v1/asyncconfigs/failing", json=config)).raise_for_status()


async def run(args: argparse.Namespace, dev: Dev, http: httpx.AsyncClient, runs: Path) -> None:
    rng = random.Random(args.seed)
    mix = ["quick", "quick", "warm", "warm", "warm", "failing"] * 4 + ["slow"]
    accepted: dict[str, str] = {}
    unanswered: set[str] = set()
    refused: Counter[int] = Counter()
    kills: Counter[str] = Counter()
    stop = time.monotonic() + args.seconds

    async def submitter(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            function, task_id = rng.choice(mix), f"c{args.seed}-{k}-{i}"
            i += 1
            try:
                body = {"function": function, "id": task_id, "payload": {"n": i}}
                status = (await http.post("/v1/tasks", json=body)).status_code
            except httpx.HTTPError:
                unanswered.add(task_id)
                await asyncio.sleep(0.2)
                continue
            if status in (202, 409):
                accepted[task_id] = function
            else:
                refused[status] += 1
            await asyncio.sleep(0.01)

    async def freeze(pid: int, seconds: float) -> None:
        """SIGSTOP, then SIGCONT: a process that stalls (a VM paused, a long collection) and
        comes back to find its work taken over."""
        try:
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(seconds)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    frozen: list[asyncio.Task[None]] = []

    async def faults() -> None:
        while time.monotonic() < stop - 15:
            await asyncio.sleep(rng.uniform(1.5, 4))
            found = [(p, component(cmdline(p))) for p in children(dev.pid)]
            targets = [(p, name) for p, name in found if name is not None]
            if not targets:
                continue
            pid, name = rng.choice(targets)
            if rng.random() < args.freezes:
                frozen.append(asyncio.create_task(freeze(pid, rng.uniform(2, 10))))
                froze[name] += 1
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                kills[name] += 1
            except ProcessLookupError:
                pass

    froze: Counter[str] = Counter()
    await asyncio.gather(*(submitter(k) for k in range(4)), faults())
    await asyncio.gather(*frozen)
    print(
        f"accepted {len(accepted)}, refused {dict(refused)}, unanswered {len(unanswered)};"
        f" killed {dict(kills)}, frozen {dict(froze)}"
    )
    await settle(args, http, accepted, unanswered, runs)


async def settle(
    args: argparse.Namespace,
    http: httpx.AsyncClient,
    accepted: dict[str, str],
    unanswered: set[str],
    runs: Path,
) -> None:
    """Wait for every accepted task (and every unanswered one that exists) to end, then tally."""
    waiting = set(accepted) | unanswered
    seen: dict[str, tuple[str, str, int]] = {}
    deadline = time.monotonic() + args.wait
    while waiting and time.monotonic() < deadline:
        for task_id in list(waiting):
            try:
                resp = await http.get(f"/v1/tasks/{task_id}")
            except httpx.HTTPError:  # the gateway killed last is not back yet
                break
            if resp.status_code == 404 and task_id in unanswered:
                waiting.discard(task_id)  # never accepted
                continue
            if resp.status_code != 200:  # a restarted nats-server still loading: ask again
                continue
            task = resp.json()
            status = task["status"]
            seen[task_id] = (task["spec"]["function"], status["phase"], status["attempts"])
            if status["phase"] in TERMINAL:
                waiting.discard(task_id)
        if waiting:
            await asyncio.sleep(2)
    outcomes = Counter(seen.values())
    for (function, phase, attempts), n in sorted(outcomes.items()):
        mark = "" if expected(function, phase, attempts) else "   <- not as its policy says"
        print(f"  {function:8} {phase:10} {attempts} attempt(s): {n}{mark}")
    late = {t: seen.get(t, ("?", "never read", 0))[1] for t in waiting}
    print(f"not ended after {args.wait:g} s: {len(late)} {dict(Counter(late.values()))}")
    # A run is noted when its command starts, so an attempt lost before that has none; a run
    # beyond the attempts counted is one the platform did not know it started.
    extra = {}
    unrun: Counter[str] = Counter()
    for task_id, (function, _, attempts) in seen.items():
        if function not in ("quick", "slow"):
            continue
        ledger = runs / task_id
        ran = ledger.read_text().count("run") if ledger.exists() else 0
        if ran > attempts:
            extra[task_id] = (function, attempts, ran)
        unrun[function] += attempts - ran if ran < attempts else 0
    print(f"attempts of which no run was noted (lost before the command started): {dict(unrun)}")
    print(f"tasks that ran more often than their attempts: {len(extra)} {list(extra.items())[:5]}")


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kt-chaos-"))
    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="kt-chaos-runs-"))
    runs.mkdir(parents=True, exist_ok=True)
    runs.chmod(0o1777)  # written by accounts' users too
    flags = ("--dispatchers", "2", "--ack-wait", str(args.ack_wait))
    async with running_dev(work, *flags) as dev:
        headers = {"Authorization": f"Bearer {dev.token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=headers, timeout=10) as http:
            await setup(http, runs)
            await run(args, dev, http, runs)
    print(f"(kubetask dev's log: {work / 'dev.out'})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ack-wait", type=float, default=5, help="kubetask dev --ack-wait")
    ap.add_argument(
        "--freezes", type=float, default=0.3, help="the share of faults that stop, not kill"
    )
    ap.add_argument("--wait", type=float, default=240, help="how long tasks may take to end")
    ap.add_argument(
        "--runs-dir",
        type=Path,
        help="where functions note their runs; outside /tmp with KUBETASK_FUNCTION_USERS=accounts"
        " (an account's /tmp is its own)",
    )
    asyncio.run(main(ap.parse_args()))
