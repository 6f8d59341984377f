"""The registry is the source of truth: put back into the broker whatever it forgot.

How a vanished task is recognised:
- RUNNING job: its worker renews ``Job.heartbeat_at`` every few seconds; a heartbeat older than the
  lease means the worker died (SIGKILL, power, an embedded broker that lost the fetched message).
  ``crashes.recover_lost`` settles it: re-queued (to run alone if it ran with others when the worker
  died), or FAILED when it has now crashed its worker alone ``crashes.MAX_CRASHES`` times.
- QUEUED job: the broker is asked directly (``broker_state``: Redis, or the embedded broker's table):
  the job's ``celery_task_id`` must be waiting in the queue, or delivered and not overdue by more than
  ``START_GRACE_S`` (a retry's message is due at its ETA): a due message a worker took and held that
  long without its job starting belongs to a worker that died (Redis would give it back only after the
  visibility timeout, an hour; the embedded broker never). Redis keeps nothing on disk here, so after a
  restart or FLUSHDB the id is gone and the job is re-sent. On a broker that cannot be read, a job
  waiting longer than ``stale_s`` is re-sent.
- QUEUED study without a job (the node died between its commit and its enqueue): enqueued.
- QUEUED dialog turn whose task id is not in the Redis broker: re-sent (the API is still waiting).
- Dialog turn QUEUED or RUNNING for ``STUCK_DIALOG_TURN_S``: FAILED with a reason (ask again), never
  answered an hour later into a conversation that moved on.
A re-sent duplicate is harmless: a job is claimed once (compare-and-set) and its report is unique.

``Sweeper`` runs ``reconcile`` and sends due exports periodically (a thread in ``radialog worker`` and
``radialog run``); with several workers a Redis lock lets one of them sweep per interval.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from sqlalchemy import and_, or_, select, update

from radialog.logging import get_logger
from radialog.messaging import (
    DIALOG_QUEUE,
    JOB_MODEL_VERSION,
    REPORT_QUEUE,
    enqueue_report,
    is_redis_url,
    redis_client,
    send_dialog_turn,
    send_export_tasks,
    send_report_task,
)
from radialog.registry import DialogTurn, ErrorKind, Job, JobState, Registry, Study, StudyState, TurnState, utcnow
from radialog.settings import Settings
from reporting.export import due_exports
from workers.broker_state import START_GRACE_S, broker_messages
from workers.context import DEFAULT_LEASE_S
from workers.crashes import FAILED as CRASH_FAILED
from workers.crashes import REQUEUED, recover_lost

log = get_logger(__name__)

#: A dialog turn still RUNNING this long after it was asked lost its worker (the longest answer, 600
#: tokens, takes seconds on a GPU).
STUCK_DIALOG_TURN_S = 600.0


@dataclass
class ReconcileResult:
    requeued_running: list[int] = field(default_factory=list)
    failed_crashing: list[int] = field(default_factory=list)  # crashed their worker alone MAX_CRASHES times
    resent_queued: list[int] = field(default_factory=list)
    enqueued_studies: list[int] = field(default_factory=list)
    resent_dialog_turns: list[int] = field(default_factory=list)
    failed_dialog_turns: list[int] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(
            self.requeued_running
            or self.failed_crashing
            or self.resent_queued
            or self.enqueued_studies
            or self.resent_dialog_turns
            or self.failed_dialog_turns
        )


def broker_task_ids(
    settings: Settings, queue: str = REPORT_QUEUE, held_within_s: float | None = None
) -> set[str] | None:
    """Task ids the broker holds for ``queue``: waiting, or delivered (with ``held_within_s``, only those
    not overdue by more than that: see ``broker_state``); None if unknowable."""
    messages = broker_messages(settings, queue)
    if messages is None:
        return None
    now = time.time()
    return {m.task_id for m in messages if held_within_s is None or m.held_by_a_live_worker(now, held_within_s)}


def reconcile(
    registry: Registry,
    settings: Settings,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    grace_s: float = 10.0,
    stale_s: float = 300.0,
) -> ReconcileResult:
    """One pass: re-queue dead workers' jobs, re-send forgotten QUEUED jobs, enqueue orphan studies."""
    result = ReconcileResult()
    now = utcnow()
    model_name = settings.model_backend

    # 1. RUNNING jobs whose worker stopped renewing the lease.
    with registry.session() as session:
        stale = now - timedelta(seconds=lease_s)
        dead = session.scalars(
            select(Job.id).where(
                Job.state == JobState.RUNNING.value,
                or_(Job.heartbeat_at < stale, and_(Job.heartbeat_at.is_(None), Job.started_at < stale)),
            )
        ).all()
    for job_id in dead:
        with registry.session() as session:  # who is charged for the lost claim: workers.crashes
            outcome = recover_lost(session, job_id, lease_s, settings)
            if outcome == CRASH_FAILED:
                result.failed_crashing.append(job_id)
            if outcome != REQUEUED:
                continue
            task_id = uuid.uuid4().hex
            session.execute(update(Job).where(Job.id == job_id).values(celery_task_id=task_id))
            priority = session.scalar(select(Job.priority).where(Job.id == job_id))
        send_report_task(settings, job_id, task_id, priority=priority if priority is not None else 1)
        result.requeued_running.append(job_id)

    # 2. QUEUED jobs whose message the broker no longer has (or only a dead worker holds).
    present = broker_task_ids(settings, held_within_s=START_GRACE_S)
    with registry.session() as session:
        cutoff = now - timedelta(seconds=grace_s if present is not None else stale_s)
        waiting = session.execute(
            select(Job.id, Job.celery_task_id, Job.priority).where(
                Job.state == JobState.QUEUED.value, Job.model_name == model_name, Job.queued_at < cutoff
            )
        ).all()
    for job_id, old_task_id, priority in waiting:
        if present is not None and old_task_id in present:
            continue
        task_id = uuid.uuid4().hex
        with registry.session() as session:
            moved = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED.value, Job.celery_task_id == old_task_id)
                .values(celery_task_id=task_id, queued_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
        if moved:
            send_report_task(settings, job_id, task_id, priority=priority)
            result.resent_queued.append(job_id)

    # 3. QUEUED studies whose job is missing, or still FAILED (a re-run that died between moving the
    #    study to QUEUED and resetting its job): enqueue_report creates or resets it.
    with registry.session() as session:
        orphans = session.scalars(
            select(Study.id).where(
                Study.state == StudyState.QUEUED.value,
                Study.updated_at < now - timedelta(seconds=grace_s),
                ~select(Job.id)
                .where(
                    Job.study_id == Study.id,
                    Job.model_name == model_name,
                    Job.model_version == JOB_MODEL_VERSION,
                    Job.state != JobState.FAILED.value,
                )
                .exists(),
            )
        ).all()
    for study_id in orphans:
        enqueue_report(registry, settings, study_id)
        result.enqueued_studies.append(study_id)

    # 4. Dialog turns left RUNNING by a worker that died, or QUEUED that long (held by a dead worker, or
    #    every worker busy for ten minutes). A turn is interactive: rather than answer it an hour later (when
    #    the broker gives the message back) into a conversation that moved on, it fails with a reason and
    #    the radiologist asks again; a late delivery then finds it FAILED.
    reasons = {
        TurnState.RUNNING.value: (ErrorKind.WORKER_LOST, "the worker stopped while answering; please ask again"),
        TurnState.QUEUED.value: (ErrorKind.NOT_TAKEN, "no worker took the question in time; please ask again"),
    }
    with registry.session() as session:
        stuck = session.execute(
            select(DialogTurn.id, DialogTurn.state).where(
                DialogTurn.state.in_(list(reasons)),
                DialogTurn.created_at < now - timedelta(seconds=STUCK_DIALOG_TURN_S),
            )
        ).all()
        for turn_id, state in stuck:
            kind, reason = reasons[state]
            session.execute(
                update(DialogTurn)
                .where(DialogTurn.id == turn_id, DialogTurn.state == state)
                .values(state=TurnState.FAILED.value, answered_at=now, error=reason, error_kind=kind.value)
            )
    result.failed_dialog_turns = [turn_id for turn_id, _ in stuck]

    # 5. Waiting dialog turns (younger than that) whose message the (Redis) broker no longer has.
    if is_redis_url(settings.broker_url):
        result.resent_dialog_turns = _resend_dialog_turns(registry, settings, now - timedelta(seconds=grace_s))

    if result.changed:
        log.warning(
            "reconciler restored work",
            extra={
                "requeued_running": result.requeued_running,
                "failed_crashing": result.failed_crashing,
                "resent_queued": result.resent_queued,
                "enqueued_studies": result.enqueued_studies,
                "resent_dialog_turns": result.resent_dialog_turns,
                "failed_dialog_turns": result.failed_dialog_turns,
            },
        )
    return result


def _resend_dialog_turns(registry: Registry, settings: Settings, cutoff: datetime) -> list[int]:
    present = broker_task_ids(settings, DIALOG_QUEUE) or set()
    with registry.session() as session:
        waiting = session.execute(
            select(DialogTurn.id, DialogTurn.celery_task_id).where(
                DialogTurn.state == TurnState.QUEUED.value, DialogTurn.created_at < cutoff
            )
        ).all()
    resent = []
    for turn_id, old_task_id in waiting:
        if old_task_id in present:
            continue
        task_id = uuid.uuid4().hex
        with registry.session() as session:
            moved = session.execute(
                update(DialogTurn)
                .where(
                    DialogTurn.id == turn_id,
                    DialogTurn.state == TurnState.QUEUED.value,
                    DialogTurn.celery_task_id == old_task_id,
                )
                .values(celery_task_id=task_id)
            ).rowcount  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
        if moved:
            send_dialog_turn(settings, turn_id, task_id)
            resent.append(turn_id)
    return resent


def send_due_exports(registry: Registry, settings: Settings) -> list[int]:
    """Send an export task for every outbox row whose next attempt is due."""
    with registry.session() as session:
        export_ids = list(due_exports(session, utcnow()))
    if export_ids:
        send_export_tasks(settings, export_ids)
    return export_ids


class Sweeper:
    """A daemon thread: every ``interval_s`` reconcile and send due exports (one sweeper per interval
    across workers when the broker is Redis)."""

    LOCK_KEY = "radialog:sweep-lock"

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        *,
        interval_s: float = 10.0,
        lease_s: float = DEFAULT_LEASE_S,
        grace_s: float = 10.0,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.interval_s = interval_s
        self.lease_s = lease_s
        self.grace_s = grace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="radialog-sweeper", daemon=True)
        self._redis = redis_client(settings)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def _my_turn(self) -> bool:
        if self._redis is None:
            return True
        try:
            ttl_ms = max(1, int(self.interval_s * 900))
            return bool(self._redis.set(self.LOCK_KEY, "1", nx=True, px=ttl_ms))
        except redis.RedisError:
            return True  # the broker is down: reconciling against the registry still helps later

    def sweep_once(self) -> None:
        try:
            reconcile(self.registry, self.settings, lease_s=self.lease_s, grace_s=self.grace_s)
        except Exception:
            log.warning("reconcile pass failed", exc_info=True)
        try:
            send_due_exports(self.registry, self.settings)
        except Exception:
            log.warning("export sweep failed", exc_info=True)

    def _loop(self) -> None:
        first = True
        while True:
            # A first pass at start whatever the lock says: a worker restarted after a crash picks up what
            # it left at once, not after the dead process's lock expires (every step is a compare-and-set,
            # so a pass beside another sweeper only repeats work).
            if first or self._my_turn():
                self.sweep_once()
            first = False
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
