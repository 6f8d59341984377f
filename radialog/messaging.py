"""How the processes talk: queue and task names, the Celery app every process sends with, the broker's Redis,
dialog channels, and the two ways a report job enters the queues (``enqueue_report``, ``rerun``).

Roles never import each other to send work: the node enqueues through this module, the API sends dialog turns,
exports and re-runs through it, and the workers consume what it sends. The registry stays the source of truth;
a message is only a nudge (the workers' reconciler re-sends whatever the broker forgot).

Queues: ``dialog`` (interactive turns, GPU), ``report`` (report jobs, GPU, batched by the worker) and ``export``
(SR delivery, I/O only). A worker consuming several queues serves them in the order given to ``-Q`` (transport
option ``queue_order_strategy='priority'``), so waiting dialog turns are taken before waiting report jobs.

Delivery: ``acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1, so a message is acknowledged only after its
task finished; a killed worker's message comes back (at once for a killed pool child; after the visibility timeout
for a killed worker process, swept every ``UNACKED_RESTORE_INTERVAL`` s).

Celery is imported when the first app is built, so importing this module (readiness checks, the API's
settings) stays light.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from radialog.logging import get_logger
from radialog.registry import Job, JobState, Registry, Study, StudyState, transition, utcnow
from radialog.routing import Priority
from radialog.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = get_logger(__name__)

DIALOG_QUEUE, EXPORT_QUEUE, REPORT_QUEUE = "dialog", "export", "report"
#: Queue names, in the order a GPU worker serves them by default (dialog first, tiny exports next).
QUEUES: tuple[str, ...] = (DIALOG_QUEUE, EXPORT_QUEUE, REPORT_QUEUE)

REPORT_TASK = "radialog.report"  # [job_id]
DIALOG_TASK = "radialog.dialog_turn"  # [turn_id]
EXPORT_TASK = "radialog.export"  # [export_id]

TASK_ROUTES: dict[str, dict[str, str]] = {
    REPORT_TASK: {"queue": REPORT_QUEUE},
    DIALOG_TASK: {"queue": DIALOG_QUEUE},
    EXPORT_TASK: {"queue": EXPORT_QUEUE},
}

#: Seconds between the Redis transport's sweeps for unacknowledged messages whose visibility timeout
#: has passed (kombu's default is ~100 s: interval 10 x throttle 10).
UNACKED_RESTORE_INTERVAL = 5

#: Jobs are keyed by the configured backend; the exact model version and file hash are recorded in
#: the Report (and the SR), which ``reporting.versions.create_ai_draft`` makes unique per (study, model, version).
JOB_MODEL_VERSION = "configured"
#: Study states a re-run may start from (the API's button, ``rerun``).
RERUNNABLE: tuple[StudyState, ...] = (StudyState.FAILED, StudyState.SKIPPED)


# -- the broker ---------------------------------------------------------------------------------------
class BrokerUnavailable(Exception):
    """The broker (Redis, or the embedded broker's file) cannot be reached; callers tell "broker down" from
    "nothing there" by this type."""


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis broker (else: the embedded SQLite broker of ``radialog run``)."""
    return url.startswith(("redis://", "rediss://", "unix://"))


def connect_redis(url: str) -> redis.Redis:
    """A client for the Redis at ``url`` with short timeouts (connects on first use): callers fail fast
    and tell a broker outage by ``redis.RedisError``."""
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def redis_client(settings: Settings) -> redis.Redis | None:
    """A client for the broker's Redis, or None for an embedded broker."""
    if not is_redis_url(settings.broker_url):
        return None
    return connect_redis(settings.broker_url)


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis broker at ``url`` answers a PING now."""
    if not is_redis_url(url):
        return False
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def dialog_channel(broker_url: str, turn_id: int) -> str:
    """The Redis pub/sub channel of one dialog turn's token stream.

    Pub/sub channels are global to a Redis server, not per database number, so the name carries the
    broker's database: two deployments (or test runs) on one server never hear each other's tokens.
    """
    database = urlsplit(broker_url).path.strip("/") or "0"
    return f"radialog:{database}:dialog:{turn_id}"


# -- the Celery app -----------------------------------------------------------------------------------
def transport_options(settings: Settings) -> dict[str, Any]:
    """Broker transport options. Only Redis has them; kombu's SQLAlchemy transport would hand them to
    ``create_engine`` and its virtual channels serve queues round-robin (no dialog-first order there)."""
    if not is_redis_url(settings.broker_url):
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
    """A Celery app for ``settings``' broker. Senders and workers share it; the worker registers the tasks
    (``workers.tasks``, shared tasks: known to every app)."""
    from celery import Celery
    from kombu import Queue

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
        task_default_queue=REPORT_QUEUE,
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
    return app


_APPS: dict[tuple[str, str, int], Celery] = {}


def app_for(settings: Settings) -> Celery:
    """The (cached) app for ``settings``: one per broker, result backend and visibility timeout."""
    key = (settings.broker_url, settings.resolved_result_backend, settings.visibility_timeout)
    if key not in _APPS:
        _APPS[key] = make_app(settings)
    return _APPS[key]


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each queue, read from the broker (kombu's passive declare counts every priority
    sub-queue on Redis); ``BrokerUnavailable`` when the broker does not answer."""
    from kombu.exceptions import ChannelError, KombuError
    from kombu.exceptions import OperationalError as KombuOperationalError

    try:
        with app_for(settings).connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            channel: Any = conn.default_channel
            depths: dict[str, int] = {}
            for name in QUEUES:
                try:
                    depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
                except ChannelError:  # never declared: nobody sent to it, nothing waits
                    depths[name] = 0
            return depths
    except (OSError, KombuError, KombuOperationalError, redis.RedisError) as exc:
        raise BrokerUnavailable(type(exc).__name__) from exc


# -- senders ------------------------------------------------------------------------------------------
# ``ignore_result``: outcomes live in the registry. Without it Celery subscribes the sender to the task's
# result channel before publishing, and while Redis is down that subscription alone retries for ~19 s:
# the node's assembler (one thread) stalled that long per study instead of failing fast to the reconciler.
#: Study priority rank (``Job.priority``: 0 HIGH, 1 ROUTINE, 2 LOW, ``radialog.routing``) -> Celery message
#: priority. On Redis 0 is served first, and a message without a priority also counts as 0: so every report
#: message carries one, and ROUTINE is not 0 (kombu's default priority steps are 0, 3, 6, 9).
CELERY_PRIORITY = {0: 0, 1: 3, 2: 6}


def send_report_task(
    settings: Settings, job_id: int, task_id: str, countdown: float | None = None, priority: int = 1
) -> None:
    app_for(settings).send_task(
        REPORT_TASK,
        args=[job_id],
        task_id=task_id,
        queue=REPORT_QUEUE,
        countdown=countdown,
        ignore_result=True,
        priority=CELERY_PRIORITY.get(priority, 3),
    )


def send_export_tasks(settings: Settings, export_ids: Sequence[int]) -> None:
    app = app_for(settings)
    for export_id in export_ids:
        app.send_task(EXPORT_TASK, args=[export_id], queue=EXPORT_QUEUE, ignore_result=True)


def send_dialog_turn(settings: Settings, turn_id: int, task_id: str) -> None:
    """Send one dialog turn under the task id stored in its row (the reconciler looks that id up)."""
    app_for(settings).send_task(DIALOG_TASK, args=[turn_id], task_id=task_id, queue=DIALOG_QUEUE, ignore_result=True)


# -- report jobs --------------------------------------------------------------------------------------
def enqueue_report(registry: Registry, settings: Settings, study_id: int) -> int:
    """Create (or find) the study's report job and send its task; returns the job id.

    Safe to repeat: a job that is DONE or RUNNING is left alone, a FAILED one is reset only when its
    study is QUEUED again (``rerun``); a QUEUED one gets one more message, which is harmless.
    """
    model_name = settings.model_backend
    with registry.session() as session:
        study_priority = session.scalar(select(Study.priority).where(Study.id == study_id))
        rank = Priority(study_priority).rank if study_priority in Priority.__members__ else 1
        job = session.scalar(
            select(Job).where(
                Job.study_id == study_id, Job.model_name == model_name, Job.model_version == JOB_MODEL_VERSION
            )
        )
        if job is None:
            job = Job(
                study_id=study_id,
                model_name=model_name,
                model_version=JOB_MODEL_VERSION,
                state=JobState.QUEUED.value,
                attempts=0,
                queued_at=utcnow(),
                timings={},
                priority=rank,
            )
            try:
                with session.begin_nested():
                    session.add(job)
            except IntegrityError:  # another process created it at the same moment
                job = session.scalars(select(Job).where(Job.study_id == study_id, Job.model_name == model_name)).one()
        if job.state == JobState.FAILED.value:
            # A FAILED job runs again only once its study was deliberately queued again (re-run).
            study = session.get(Study, study_id)
            if study is None or study.state != StudyState.QUEUED.value:
                return job.id
            job.state, job.error, job.attempts, job.queued_at = JobState.QUEUED.value, None, 0, utcnow()
            # A study that crashed the worker gets its tries again, and still runs alone (``isolated`` stays).
            job.crashes, job.lost_claims, job.run_mode = 0, 0, None
        if job.state != JobState.QUEUED.value:
            return job.id
        job.priority = rank  # a re-run takes the study's priority as it is now
        job.celery_task_id = task_id = uuid.uuid4().hex
        job_id = job.id
    send_report_task(settings, job_id, task_id, priority=rank)
    log.info("report job queued", extra={"job": job_id, "study": study_id, "priority": Priority.from_rank(rank).value})
    return job_id


def queue_again(session: Session, study_id: int, reason: str) -> bool:
    """Move a FAILED or SKIPPED study back to QUEUED in the caller's transaction (the caller commits, then
    calls ``enqueue_report``); False when the study is in another state."""
    return transition(session, study_id, StudyState.QUEUED, reason, only_from=RERUNNABLE)


def rerun(registry: Registry, settings: Settings, study_id: int, reason: str = "re-run requested") -> int | None:
    """Queue a FAILED or SKIPPED study again and send its job; returns the job id, or None when the study
    was in another state."""
    with registry.session() as session:
        moved = queue_again(session, study_id, reason)
    if not moved:
        return None
    return enqueue_report(registry, settings, study_id)
