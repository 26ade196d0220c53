"""Our NATS connection parses message headers exactly as nats-py's own client does."""

from __future__ import annotations

import pytest
from kubetask.jetstream import Connection
from nats.aio.client import Client

HEADER_BLOCKS = [
    b"Nats-Stream: KV_t\r\nNats-Subject: $KV.t.a.b\r\nNats-Sequence: 12\r\n"
    b"Nats-Time-Stamp: 2026-11-24T02:00:00.1Z\r\nKV-Operation: DEL\r\n\r\n",
    b"Bad Name: 1\r\nGood:2\r\nX:\tspaced \r\n\xff\xfe: 3\r\nY: \xe2\x82\xac\r\nnocolon\r\n: empty\r\n",
    b"Tab\tName: 1\r\nBad: \xff\r\n",
    b"",
    b"\r\n\r\n",
]


@pytest.mark.parametrize("raw", HEADER_BLOCKS)
def test_header_parser_matches_nats_py(raw: bytes) -> None:
    assert Connection._parse_header_lines(raw) == Client._parse_header_lines(raw)
