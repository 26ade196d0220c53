"""What a task leaves behind and for how long: its record (the task bucket), its audit trail
(KT_EVENTS, every revision of the record) and its log lines (KT_LOGS).

- **Retention per account.** Everything is kept `KUBETASK_RETENTION_SECONDS` (the streams'
  max age); an account may keep its history for less (`KUBETASK_ACCOUNT_RETENTION=
  team-a=86400,...`). Such an account's record writes and log lines carry a per-message TTL
  (`Nats-TTL`), and JetStream copies the header with each revision into the audit stream, so
  all three expire together without any sweeping of ours. The global retention stays the
  upper bound (a stream's max age is never exceeded).
- **Compression.** The audit trail and the logs are stored S2-compressed
  (`KUBETASK_HISTORY_COMPRESSION`, on by default): successive revisions of a record repeat
  most of it (the audit trail shrinks to a fifth) and log lines are text. The task bucket is
  not: each record is rewritten a few times within seconds, so its blocks hold mostly
  superseded revisions, and compressing it saved 3% of its disk (bench/history.py) for
  nats-server work on every record write. Queues are not either: small, short-lived messages.
"""

from __future__ import annotations

import dataclasses

from nats.js import JetStreamContext
from nats.js.api import StoreCompression, StreamConfig

from .settings import Settings

TTL = "Nats-TTL"
# What the header adds to a message as stored, about.
TTL_HEADER_BYTES = 32


class Retention:
    def __init__(self, settings: Settings) -> None:
        self.default = settings.retention_seconds
        self._overrides = {
            account: min(seconds, self.default)
            for account, seconds in settings.account_retention.items()
        }
        self._headers = {
            account: {TTL: str(max(1, round(seconds)))}
            for account, seconds in self._overrides.items()
        }

    def seconds(self, account: str) -> float:
        return self._overrides.get(account, self.default)

    def shortest(self) -> float:
        return min([self.default, *self._overrides.values()])

    def headers(self, account: str) -> dict[str, str] | None:
        """The TTL header for this account's writes; None when it keeps the default."""
        return self._headers.get(account)


def stream_options(settings: Settings, compress: bool = True) -> dict[str, object]:
    """What a history stream sets: per-message TTLs allowed, and compression unless told not."""
    packed = compress and settings.history_compression
    return {
        "allow_msg_ttl": True,
        "compression": StoreCompression.S2 if packed else StoreCompression.NONE,
    }


async def apply_to(js: JetStreamContext, stream: str, settings: Settings, compress: bool) -> None:
    """Bring an existing stream (the task bucket's, made by the KV API) to the history options."""
    config: StreamConfig = (await js.stream_info(stream)).config
    options = stream_options(settings, compress)
    wanted = dataclasses.replace(config, **options)  # type: ignore[arg-type]
    if wanted != config:
        await js.update_stream(wanted)
