"""What the broker holds for a queue: each message's task id, and whether and when it was delivered.

The reconciler compares this with the registry. A message still waiting is on its way; a delivered one
is in a worker's hands. A live worker claims the job of a message within moments of receiving it (the
threads pool takes a message only for a free thread), or at its ETA for a retry's countdown; so a due
message delivered ``START_GRACE_S`` ago whose job is still QUEUED was received by a worker that died,
and nothing would give it back soon (Redis: after the visibility timeout, an hour; the embedded broker:
never). Read from kombu's own storage:

- Redis: the queue lists (and their priority sub-queues), the ``unacked`` hash (delivered, not
  acknowledged) and ``unacked_index`` (delivery time).
- the embedded broker (kombu's SQLAlchemy transport, ``sqla+sqlite://``): table ``kombu_message``, whose
  delivered rows are kept with ``visible`` false and their ``timestamp`` set to the delivery time (local).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError

from radialog.messaging import redis_client
from radialog.settings import Settings

#: Seconds a live worker may hold a due message before its job is claimed; beyond, its holder died.
START_GRACE_S = 60.0
#: Delivered rows of the embedded broker read back this far (the longest retry countdown is 300 s).
_EMBEDDED_LOOKBACK_S = 900.0

#: Redis transport: the priority sub-queues are "<queue>\x06\x16<priority>" (kombu's separator).
_PRIORITY_SEP = "\x06\x16"
_UNACKED_KEY = "unacked"
_UNACKED_INDEX_KEY = "unacked_index"  # delivery tag -> delivery time (kombu's Redis QoS)
_EMBEDDED_PREFIX = "sqla+"


@dataclass(frozen=True)
class BrokerMessage:
    task_id: str
    delivered_at: float | None  # epoch seconds; None while it waits in the queue
    eta: float | None  # epoch seconds of a countdown (retries); None = due at once

    def held_by_a_live_worker(self, now: float, grace_s: float = START_GRACE_S) -> bool:
        """Waiting, or delivered and not yet overdue (delivery or ETA + ``grace_s``)."""
        if self.delivered_at is None:
            return True
        return now < max(self.delivered_at, self.eta or 0.0) + grace_s


def _parse(raw: bytes | str, delivered_at: float | None) -> BrokerMessage | None:
    try:
        message: Any = json.loads(raw)
    except ValueError:
        return None
    if isinstance(message, list):  # Redis unacked entries are [message, exchange, routing_key]
        message = message[0] if message else {}
    headers = message.get("headers") if isinstance(message, dict) else None
    if not isinstance(headers, dict) or not headers.get("id"):
        return None
    eta = None
    if headers.get("eta"):
        try:
            eta = datetime.fromisoformat(str(headers["eta"])).timestamp()
        except ValueError:
            eta = None
    return BrokerMessage(str(headers["id"]), delivered_at, eta)


def broker_messages(settings: Settings, queue: str) -> list[BrokerMessage] | None:
    """The messages the broker holds for ``queue`` (delivered ones of any queue on Redis, where the
    unacked hash is shared); None when the broker cannot be read this way."""
    if settings.broker_url.startswith(_EMBEDDED_PREFIX):
        return _embedded_messages(settings.broker_url[len(_EMBEDDED_PREFIX) :], queue)
    return _redis_messages(settings, queue)


def _redis_messages(settings: Settings, queue: str) -> list[BrokerMessage] | None:
    client = redis_client(settings)
    if client is None:
        return None
    try:
        pipe = client.pipeline(transaction=False)
        for key in [queue] + [f"{queue}{_PRIORITY_SEP}{p}" for p in range(1, 10)]:
            pipe.lrange(key, 0, -1)
        pipe.hgetall(_UNACKED_KEY)
        pipe.zrange(_UNACKED_INDEX_KEY, 0, -1, withscores=True)
        *waiting, unacked, index = pipe.execute()
    finally:
        client.close()
    delivered = dict(index)
    found = [_parse(raw, None) for batch in waiting for raw in batch]
    found += [_parse(raw, float(delivered.get(tag, 0.0))) for tag, raw in unacked.items()]
    return [m for m in found if m is not None]


_ENGINES: dict[str, Engine] = {}


def _embedded_messages(url: str, queue: str) -> list[BrokerMessage]:
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = create_engine(url)
    since = datetime.fromtimestamp(time.time() - _EMBEDDED_LOOKBACK_S)  # noqa: DTZ006 - local time, as kombu writes it
    query = text(
        "SELECT m.payload, m.visible, m.timestamp FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
        "WHERE q.name = :queue AND (m.visible OR m.timestamp >= :since)"
    )
    try:
        with engine.connect() as conn:
            rows = conn.execute(query, {"queue": queue, "since": since.isoformat(sep=" ")}).all()
    except (OperationalError, ProgrammingError):  # no message was ever sent: kombu has not made its tables
        return []
    found = []
    for payload, visible, stamp in rows:
        delivered_at = None
        if not visible:
            stamp = stamp if isinstance(stamp, datetime) else datetime.fromisoformat(str(stamp))
            delivered_at = stamp.timestamp()
        found.append(_parse(payload, delivered_at))
    return [m for m in found if m is not None]
