"""Which study crashed the worker: a job that was in flight when its worker process died is suspect until
it has run alone.

A crash (a segfault in a codec or a native kernel, an abort, the OOM killer) takes the whole process and
every job it had claimed, from every report batch its engine was decoding. Nothing in the process survives
to say which study did it, so the registry keeps how each claim was running (``Job.run_mode``):

- ``None``: claimed, not started (waiting for the gate below). Its loss is no evidence: requeued as it was.
- ``"batch"``: running with other jobs in the process. Lost -> ``isolated``: from now on it runs alone.
  Not charged: neither its attempt budget nor ``crashes`` moves (``lost_claims`` counts it instead).
- ``"alone"``: running with nothing else in the process (the ``Gate`` held exclusively). Lost -> the crash
  is its own: ``crashes`` + 1, and at ``MAX_CRASHES`` the job and its study FAIL with the reason.

So after a crash the batch's studies are re-run one by one, each with the process to itself; a healthy
study comes through (its report is the same as in a batch) and a crashing one dies alone, again and
again if need be, without taking anyone else's attempt. Everything lives in the registry, so this holds
when the worker dies again during the one-by-one runs, whoever notices the lost claim (the reconciler, or
a worker that receives the job's message) and whatever the broker (Redis, or the embedded one that loses
the messages a dying worker held).

Why one by one and not by halves: every crash costs a worker restart (the model loaded again), the
dearest thing here; one by one a crashing study takes the process down only ``MAX_CRASHES`` times, while
halving a batch of 64 would add about six deaths per crashing study. The price is throughput while
suspects run: one study at a time on that worker, other workers unaffected.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from radialog.logging import get_logger
from radialog.registry import Job, JobState, StudyState, transition, utcnow
from radialog.settings import Settings
from workers import metrics

if TYPE_CHECKING:
    from radialog.registry import Registry

log = get_logger(__name__)

#: A job whose worker died this many times while it ran alone fails: once could be the machine (the OOM
#: killer, a GPU fault, an operator's kill -9); twice alone is the study.
MAX_CRASHES = 2

BATCH = "batch"
ALONE = "alone"

REQUEUED = "requeued"
FAILED = "failed"


def crash_reason(crashes: int) -> str:
    return (
        f"the worker process died {crashes} times while running this study alone (e.g. a decoder or "
        "model crash on this image); not retried automatically"
    )


def recover_lost(session: Session, job_id: int, lease_s: float, settings: Settings | None = None) -> str | None:
    """Settle a RUNNING job whose lease lapsed (its worker died), charging the crash only if it ran alone.

    Returns ``REQUEUED`` (QUEUED again; the caller sends or runs its message), ``FAILED`` (it crashed the
    worker alone ``MAX_CRASHES`` times), or None when the job's lease is live or it is not RUNNING. A
    compare-and-set on the claim (attempts) makes concurrent callers settle it once.
    """
    stale = utcnow() - timedelta(seconds=lease_s)
    row = session.execute(
        select(Job.attempts, Job.run_mode, Job.crashes, Job.lost_claims, Job.study_id).where(
            Job.id == job_id,
            Job.state == JobState.RUNNING.value,
            or_(Job.heartbeat_at < stale, and_(Job.heartbeat_at.is_(None), Job.started_at < stale)),
        )
    ).one_or_none()
    if row is None:
        return None
    attempts, run_mode, crashes, lost_claims, study_id = row
    now = utcnow()
    values: dict[str, Any] = {"run_mode": None, "heartbeat_at": None}
    if run_mode == ALONE:
        crashes += 1
        values["crashes"] = crashes
        if crashes >= MAX_CRASHES:
            outcome, reason = FAILED, crash_reason(crashes)
            values.update(state=JobState.FAILED.value, error=reason, finished_at=now)
        else:
            outcome, reason = REQUEUED, "the worker process died while running this study alone; retried alone"
    elif run_mode == BATCH:
        outcome, reason = REQUEUED, "the worker process died while running this study with others; re-run alone"
        values.update(isolated=True, lost_claims=lost_claims + 1)
    else:
        outcome, reason = REQUEUED, "worker lost before the study started; re-queued"
        values["lost_claims"] = lost_claims + 1
    if outcome == REQUEUED:
        values.update(state=JobState.QUEUED.value, queued_at=now, error=reason)
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.attempts == attempts)
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
    if moved != 1:
        return None
    job = session.get(Job, job_id)
    if job is not None:
        session.refresh(job)
    target = StudyState.FAILED if outcome == FAILED else StudyState.QUEUED
    transition(session, study_id, target, reason, only_from=[StudyState.RUNNING])
    log.warning(
        "job lost with its worker",
        extra={
            "job": job_id,
            "study": study_id,
            "ran": run_mode or "not started",
            "outcome": outcome,
            "crashes": crashes,
        },
    )
    if outcome == FAILED:
        metrics.FAILURES.labels(kind="crashed").inc()
        if settings is not None:  # the study.failed webhook rows, in this transaction (sent by the sweep)
            from reporting.channels.outbox import study_failed

            study_failed(session, settings, study_id, reason, now)
    return outcome


def mark_running(registry: Registry, claims: list[tuple[int, int]], mode: str) -> None:
    """Record that these claims ((job id, attempt) pairs) now run, in a batch or alone: from here on their
    loss with the process is evidence. Committed before any of their work starts."""
    with registry.session() as session:
        for job_id, attempt in claims:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.attempts == attempt)
                .values(run_mode=mode)
            )


class Gate:
    """Report batches of one process share it; a job that must run alone holds it by itself.

    Writer-first: once a job waits to run alone, no new batch starts, so it waits only for the batches
    already running.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_exclusive += 1
            try:
                self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    def hold(self, alone: bool) -> Any:
        """The exclusive hold for a job that runs alone, else a shared one."""
        return self.exclusive() if alone else self.shared()
