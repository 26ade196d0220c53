"""AIMD convergence (issue 9, benchmark 3): a warm function whose instance takes at most C
invocations at once and answers 429 beyond; a steady backlog. Prints, every second, how many
invocations the instance served at once and how many it refused; then the time to settle
within ±20% of C, the refused share at steady state, and the same after C changes from 20 to
40. Prints figures; asserts nothing. Run: .venv/bin/python bench/aimd.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
from devrun import running_dev
from kubetask.embedded import free_port

PY = sys.executable
SERVER = """
    import json, os, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {{"now": 0, "ok": 0, "busy": 0, "peak": 0}}
    lock = threading.Lock()
    CAP = {cap!r}

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the dispatcher reuses its connections

        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/stats":
                with lock:
                    out = json.dumps(state).encode()
                    state.update(ok=0, busy=0, peak=state["now"])
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                return
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            cap = int(open(CAP).read())
            with lock:
                if state["now"] >= cap:
                    state["busy"] += 1
                    refuse = True
                else:
                    state["now"] += 1
                    state["peak"] = max(state["peak"], state["now"])
                    refuse = False
            if refuse:
                self.send_response(429)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            time.sleep(0.05)
            with lock:
                state["now"] -= 1
                state["ok"] += 1
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{{}}")

    stats = ThreadingHTTPServer(("127.0.0.1", {stats_port}), H)
    threading.Thread(target=stats.serve_forever, daemon=True).start()
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kt-aimd-"))
    cap = work / "cap"
    cap.write_text("20")
    stats_port = free_port()
    script = work / "server.py"
    script.write_text(textwrap.dedent(SERVER.format(cap=str(cap), stats_port=stats_port)))
    async with running_dev(work) as dev:
        token, url = dev.token, dev.url
        # The instance serves invocations on $PORT and its counters on a port of our own.
        command = [PY, str(script)]
        fn = {
            "metadata": {"name": "capped"},
            "spec": {
                "server": {"command": command, "concurrency": 200, "maxInstances": 1},
                "maxConcurrency": 200,
            },
        }
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as http:
            (await http.put("/v1/functions/capped", json=fn)).raise_for_status()
            stop = time.monotonic() + args.seconds

            async def submit(n: int) -> None:
                await asyncio.gather(
                    *(http.post("/v1/tasks", json={"function": "capped"}) for _ in range(n))
                )

            async def feed() -> None:  # keeps a backlog: at least a few hundred tasks waiting
                while time.monotonic() < stop:
                    waiting = (await http.get("/v1/limits")).json()["queues"]
                    if not waiting or waiting[0]["waiting"] < 3000:
                        await submit(200)
                    else:
                        await asyncio.sleep(0.1)

            await submit(500)

            feeding = asyncio.create_task(feed())
            stats = httpx.AsyncClient(base_url=f"http://127.0.0.1:{stats_port}")
            t0 = time.monotonic()
            changed_at = args.seconds / 2
            rows = []
            while time.monotonic() < stop:
                await asyncio.sleep(1)
                if not rows or rows[-1][0] < changed_at <= time.monotonic() - t0:
                    if time.monotonic() - t0 >= changed_at and cap.read_text() == "20":
                        cap.write_text("40")
                with_cap = int(cap.read_text())
                try:
                    s = (await stats.get("/stats")).json()
                except httpx.HTTPError:
                    continue
                t = time.monotonic() - t0
                rows.append((t, with_cap, s["peak"], s["ok"], s["busy"]))
                print(
                    f"t={t:5.1f}s C={with_cap} peak in flight {s['peak']:3d} "
                    f"served {s['ok']:4d} refused {s['busy']:4d}",
                    flush=True,
                )
            feeding.cancel()
            await stats.aclose()
        for c, start in ((20, 0.0), (40, changed_at)):
            phase = [r for r in rows if r[1] == c and r[0] >= start]
            settled = next((r[0] - start for r in phase if abs(r[2] - c) <= 0.2 * c), None)
            steady = [r for r in phase if r[0] - start >= 5]
            refused = sum(r[4] for r in steady) / max(1, sum(r[3] + r[4] for r in steady))
            print(
                f"C={c}: settled within ±20% after {settled}s; refused at steady state "
                f"{refused:.1%}"
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40)
    asyncio.run(main(ap.parse_args()))
    os._exit(0)
