"""What a task leaves behind and for how long: its record (the task bucket), its audit trail
(KT_EVENTS, every revision of the record) and its log lines (KT_LOGS).

- **Retention per account.** Everything is kept `KUBETASK_RETENTION_SECONDS` (the streams'
  max age); an account may keep its history for less (`KUBETASK_ACCOUNT_RETENTION=
  team-a=86400,...`). Such an account's record writes and log lines carry a per-message TTL
  (`Nats-TTL`), and JetStream copies the header with each revision into the audit stream, so
  all three expire together without any sweeping of ours. The global retention stays the
  upper bound (a stream's max age is never exceeded).
- **Compression.** The three history streams are stored S2-compressed
  (`KUBETASK_HISTORY_COMPRESSION`, on by default): records and log lines are JSON and
  successive revisions of a record repeat most of it. Queues are not compressed — their
  messages are small and short-lived.
"""

from __future__ import annotations

import dataclasses

from nats.js import JetStreamContext
from nats.js.api import StoreCompression, StreamConfig

from .settings import Settings

TTL = "Nats-TTL"


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


def stream_options(settings: Settings) -> dict[str, object]:
    """What every history stream sets: per-message TTLs allowed, and compression."""
    compression = StoreCompression.S2 if settings.history_compression else StoreCompression.NONE
    return {"allow_msg_ttl": True, "compression": compression}


async def apply_to(js: JetStreamContext, stream: str, settings: Settings) -> None:
    """Bring an existing stream (the task bucket's, made by the KV API) to the history options."""
    config: StreamConfig = (await js.stream_info(stream)).config
    wanted = dataclasses.replace(config, **stream_options(settings))  # type: ignore[arg-type]
    if wanted != config:
        await js.update_stream(wanted)
