"""The API's links to the broker: Redis (pub/sub for streamed answers), worker readiness
(``radialog.presence``: Redis keys, or files beside the embedded broker) and Celery.

Tasks are sent by name ("radialog.dialog_turn", "radialog.export") through the workers' Celery app
(``workers.celery_app.app_for(settings)``) when it is importable, else through a bare Celery client on the same broker; the API never imports
model code. Redis is reached lazily so the API starts (and serves reads) while the broker is down.
"""

from __future__ import annotations

from typing import Any

import redis

from radialog.logging import get_logger
from radialog.presence import Presence, is_redis_url, presence_for
from radialog.settings import Settings

log = get_logger(__name__)


class Services:
    """Lazily created Redis and Celery clients for one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: redis.Redis | None = None
        self._celery: Any = None
        self.presence: Presence = presence_for(settings)

    @property
    def redis_url(self) -> str | None:
        """The broker's Redis URL; None with the embedded broker (answers are then polled, not streamed)."""
        url = self.settings.broker_url
        return url if is_redis_url(url) else None

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            if self.redis_url is None:
                raise redis.ConnectionError("the broker is not Redis: dialog streaming needs Redis")
            self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)
        return self._redis

    def ready_workers(self) -> list[dict[str, Any]]:
        """Provenance of every worker with its model loaded (empty when none); BrokerUnavailable when the
        broker cannot be reached."""
        return self.presence.ready()

    @property
    def celery(self) -> Any:
        if self._celery is None:
            try:
                from workers.celery_app import app_for

                celery_app = app_for(self.settings)  # the workers' app, for this app's broker
            except ImportError:
                from celery import Celery

                celery_app = Celery("radialog-api", broker=self.settings.broker_url)
                celery_app.conf.update(task_serializer="json", accept_content=["json"])
            self._celery = celery_app
        return self._celery

    def send_task(self, name: str, args: list[Any], queue: str, task_id: str | None = None) -> str:
        """Send a task by name to ``queue``; returns the Celery task id."""
        result = self.celery.send_task(name, args=args, queue=queue, task_id=task_id)
        return str(result.id)

    def close(self) -> None:
        self.presence.close()
        if self._redis is not None:
            self._redis.close()
            self._redis = None
