"""The Celery application: JSON messages, three queues, and the delivery guarantees the pipeline relies on.

Queues: ``dialog`` (interactive turns, GPU), ``report`` (report jobs, GPU, batched by the worker) and
``export`` (SR delivery, I/O only). A worker consuming several queues serves them in the order given to
``-Q`` (transport option ``queue_order_strategy='priority'``), so waiting dialog turns are taken before
waiting report jobs.

Delivery: ``acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1, so a message is acknowledged only
after its task finished; a killed worker's message comes back (at once for a killed pool child; after
the visibility timeout for a killed worker process, swept every ``UNACKED_RESTORE_INTERVAL`` s). The
registry stays the source of truth: the reconciler re-sends whatever the broker forgot.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu import Queue

from radialog.settings import Settings, get_settings

#: Queue names, in the order a GPU worker serves them by default (dialog first, tiny exports next).
QUEUES: tuple[str, ...] = ("dialog", "export", "report")

REPORT_TASK = "radialog.report"
DIALOG_TASK = "radialog.dialog_turn"
EXPORT_TASK = "radialog.export"

TASK_ROUTES: dict[str, dict[str, str]] = {
    REPORT_TASK: {"queue": "report"},
    DIALOG_TASK: {"queue": "dialog"},
    EXPORT_TASK: {"queue": "export"},
}

#: Seconds between the Redis transport's sweeps for unacknowledged messages whose visibility timeout
#: has passed (kombu's default is ~100 s: interval 10 x throttle 10).
UNACKED_RESTORE_INTERVAL = 5


def transport_options(settings: Settings) -> dict[str, Any]:
    """Broker transport options. Only Redis has them; kombu's SQLAlchemy transport would hand them to
    ``create_engine`` and its virtual channels serve queues round-robin (no dialog-first order there)."""
    if not settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        return {}
    return {
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
        "unacked_restore_interval": UNACKED_RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
    }


def make_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``' broker; the tasks are registered with every app (shared_task)."""
    app = Celery("radialog", broker=settings.broker_url, backend=settings.resolved_result_backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="report",
        task_routes=TASK_ROUTES,
        # The registry holds every outcome; results would only fill the backend.
        task_ignore_result=True,
        result_expires=3600,
        broker_transport_options=transport_options(settings),
        result_backend_transport_options=(
            {"visibility_timeout": settings.visibility_timeout} if transport_options(settings) else {}
        ),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    app.conf.imports = ("workers.tasks",)
    return app


_APPS: dict[tuple[str, str, int], Celery] = {}


def app_for(settings: Settings) -> Celery:
    """The (cached) app for ``settings``: tests and ``radialog run`` use settings other than the env's."""
    key = (settings.broker_url, settings.resolved_result_backend, settings.visibility_timeout)
    if key not in _APPS:
        _APPS[key] = make_app(settings)
    return _APPS[key]


#: The process-wide app for the environment's settings (``celery -A workers.celery_app``, the API).
app: Celery = app_for(get_settings())


def dialog_channel(broker_url: str, turn_id: int) -> str:
    """The Redis pub/sub channel of one dialog turn's token stream.

    Pub/sub channels are global to a Redis server, not per database number, so the name carries the
    broker's database: two deployments (or test runs) on one server never hear each other's tokens.
    """
    database = urlsplit(broker_url).path.strip("/") or "0"
    return f"radialog:{database}:dialog:{turn_id}"
