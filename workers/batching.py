"""Micro-batching through the registry: one Celery message wakes a worker, which claims a batch.

Each report job has its own Celery message (``radialog.report [job_id]``). The worker that receives
one claims that job and then up to ``batch_size - 1`` other waiting jobs of the same model straight
from the registry (compare-and-set QUEUED -> RUNNING), waiting at most ``batch_wait_ms`` for the batch
to fill, and runs them as one ``backend.report()`` call. The other jobs' own messages, delivered later,
find their job RUNNING under a live lease or DONE and are acknowledged without work.

Why this keeps the acks_late guarantees: the claiming message is acknowledged only after the whole batch
is stored; a job claimed by a worker that then dies keeps its own unacknowledged (or still waiting)
message, and its lease (``Job.heartbeat_at``) expires, so either its message or the reconciler runs it
again. Celery's batches contrib, by contrast, acknowledges messages as it buffers them.

A job caught in a worker's death while it ran with others is ``isolated`` (``workers.crashes``): it is
never taken as a companion, and its own message runs it in a batch of one, alone in the process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from radialog.registry import Job, JobState, Registry, StudyState, transition, utcnow
from radialog.settings import Settings
from workers.crashes import recover_lost


@dataclass(frozen=True)
class Claim:
    """A job this worker now runs: ``attempt`` counts every claim, the current one included (it fences
    a worker whose claim was taken over); ``charged`` leaves out the claims lost with a worker that died
    while the job waited or ran in company; ``isolated`` jobs run alone."""

    job_id: int
    study_id: int
    attempt: int
    charged: int = 0
    isolated: bool = False
    priority: int = 1  # the study's rank: 0 HIGH, 1 ROUTINE, 2 LOW


def claim(
    session: Session,
    job_id: int,
    worker: str,
    lease_s: float,
    *,
    companion: bool = False,
    settings: Settings | None = None,
) -> Claim | None:
    """Take ``job_id`` if it is waiting, or after its last claim was lost with its worker (lease expired:
    settled first by ``crashes.recover_lost``, which decides who is charged). A ``companion`` (joining
    another job's batch) is never an isolated job."""
    recover_lost(session, job_id, lease_s, settings)
    now = utcnow()
    conditions = [Job.id == job_id, Job.state == JobState.QUEUED.value]
    if companion:
        conditions.append(Job.isolated.is_(False))
    result = session.execute(
        update(Job)
        .where(*conditions)
        .values(
            state=JobState.RUNNING.value,
            worker=worker,
            started_at=now,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            run_mode=None,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
        return None
    job = session.get(Job, job_id)
    assert job is not None
    session.refresh(job)
    transition(session, job.study_id, StudyState.RUNNING, only_from=[StudyState.QUEUED])
    return Claim(
        job_id=job.id,
        study_id=job.study_id,
        attempt=job.attempts,
        charged=job.attempts - job.lost_claims,
        isolated=job.isolated,
        priority=job.priority,
    )


def waiting_jobs(session: Session, model_name: str, limit: int, exclude: set[int]) -> list[int]:
    """Waiting jobs of ``model_name``, most urgent first, then oldest; isolated ones left out (they run alone)."""
    if limit <= 0:
        return []
    query = (
        select(Job.id)
        .where(Job.state == JobState.QUEUED.value, Job.model_name == model_name, Job.isolated.is_(False))
        .order_by(Job.priority, Job.queued_at, Job.id)
        .limit(limit + len(exclude))
    )
    return [job_id for job_id in session.scalars(query) if job_id not in exclude][:limit]


def collect_batch(
    registry: Registry,
    first_job_id: int,
    *,
    worker: str,
    model_name: str,
    batch_size: int,
    wait_s: float,
    lease_s: float,
    poll_s: float = 0.02,
    settings: Settings | None = None,
) -> list[Claim]:
    """Claim ``first_job_id`` and then more waiting jobs until ``batch_size`` or ``wait_s`` has passed; an
    isolated first job makes a batch of one.

    Returns [] when the first job is not claimable (done, failed, or running elsewhere): the message
    that asked for it was a duplicate and nothing is to be done.
    """
    with registry.session() as session:
        first = claim(session, first_job_id, worker, lease_s, settings=settings)
    if first is None:
        return []
    if first.isolated:
        return [first]
    batch = [first]
    deadline = time.monotonic() + wait_s
    while len(batch) < batch_size:
        taken = {c.job_id for c in batch}
        with registry.session() as session:
            for job_id in waiting_jobs(session, model_name, batch_size - len(batch), taken):
                claimed = claim(session, job_id, worker, lease_s, companion=True, settings=settings)
                if claimed is not None:
                    batch.append(claimed)
        remaining = deadline - time.monotonic()
        if len(batch) >= batch_size or remaining <= 0:
            break
        time.sleep(min(poll_s, remaining))
    # most urgent first: the engine admits, and the worker stores, in this order
    return sorted(batch, key=lambda c: c.priority)


def requeue(session: Session, job_id: int, reason: str) -> bool:
    """Give a RUNNING job back (QUEUED, study too); the caller sends a new message for it."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
        .values(state=JobState.QUEUED.value, heartbeat_at=None, queued_at=now, error=reason, run_mode=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
        return False
    job = session.get(Job, job_id)
    assert job is not None
    session.refresh(job)
    transition(session, job.study_id, StudyState.QUEUED, reason, only_from=[StudyState.RUNNING])
    return True
