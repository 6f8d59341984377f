"""The API's links to the broker: Redis (pub/sub for streamed answers), worker readiness
(``radialog.presence``: Redis keys, or files beside the embedded broker) and the task senders.

Tasks are sent through ``radialog.messaging`` (the same Celery app and names the workers consume); the API
never imports worker or model code. Redis is reached lazily so the API starts (and serves reads) while the
broker is down.
"""

from __future__ import annotations

from typing import Any

import redis

from radialog import messaging
from radialog.logging import get_logger
from radialog.presence import Presence, presence_for
from radialog.settings import Settings

log = get_logger(__name__)


class Services:
    """Lazily created Redis and Celery clients for one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: redis.Redis | None = None
        self.presence: Presence = presence_for(settings)

    @property
    def redis_url(self) -> str | None:
        """The broker's Redis URL; None with the embedded broker (answers are then polled, not streamed)."""
        url = self.settings.broker_url
        return url if messaging.is_redis_url(url) else None

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            if self.redis_url is None:
                raise redis.ConnectionError("the broker is not Redis: dialog streaming needs Redis")
            self._redis = messaging.connect_redis(self.redis_url)
        return self._redis

    def ready_workers(self) -> list[dict[str, Any]]:
        """Provenance of every worker with its model loaded (empty when none); BrokerUnavailable when the
        broker cannot be reached."""
        return self.presence.ready()

    def send_dialog_turn(self, turn_id: int, task_id: str) -> None:
        messaging.send_dialog_turn(self.settings, turn_id, task_id)

    def send_exports(self, export_ids: list[int]) -> None:
        messaging.send_export_tasks(self.settings, export_ids)

    def close(self) -> None:
        self.presence.close()
        if self._redis is not None:
            self._redis.close()
            self._redis = None
