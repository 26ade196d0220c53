"""The served OpenAPI document, fuzzed: schemathesis generates valid and invalid requests for
every operation and runs all of its checks against the live gateway (real NATS behind it).

No 5xx, every response (status, content type, body) as the document says, 405s that name the
methods the path has. One exception, said here rather than hidden: schemathesis counts a 422 on
a schema-valid request as a failure, but two rules cannot be written in a schema — a PUT whose
URL name differs from `metadata.name`, and a destination outside the caller's account — so
for the PUT routes 422 is an expected answer to "valid" input. And an invalid request may be
refused as 413 before its schema is read: one string a character past its `maxLength` (an
argument's is 131,071) makes a body larger than the gateway takes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from harness import Api

CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "429"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

[[operations]]
include-method = "PUT"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]
"""
SEED = os.environ.get("KUBETASK_FUZZ_SEED", "20261124")


async def _fuzz(gateway_url: str, token: str, examples: int, workdir: Path) -> tuple[int, str]:
    (workdir / "schemathesis.toml").write_text(CONFIG)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "st"),
        "--config-file",
        str(workdir / "schemathesis.toml"),
        "run",
        f"{gateway_url}/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {token}",
        "--max-examples",
        str(examples),
        "--seed",
        SEED,
        "--continue-on-failure",
        "--request-timeout",
        "15",
        "--no-color",
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return await proc.wait(), out.decode(errors="replace")


@pytest.mark.timeout(600)
async def test_the_openapi_document_holds_under_fuzzing(
    make_api: Callable[..., Awaitable[Api]], gateway_url: str, tmp_path: Path
) -> None:
    tenant = await make_api()
    await tenant.function("fuzzed", command=["true"])
    await tenant.submit("fuzzed", task_id="fuzz-0")
    code, out = await _fuzz(gateway_url, tenant.token, 40, tmp_path)
    assert code == 0, out[-20000:]
    admin = await make_api(admin=True)
    code, out = await _fuzz(gateway_url, admin.token, 15, tmp_path)
    assert code == 0, out[-20000:]
    # The service is still whole afterwards.
    assert (await tenant.http.get("/healthz")).status_code == 200
    await tenant.wait("fuzz-0")
