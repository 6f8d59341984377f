"""The study state machine, the job and export states, and the one function that moves a study.

RECEIVING -> STABLE -> QUEUED -> RUNNING -> REPORTED -> EXPORTED, with side exits SKIPPED and FAILED.
``transition`` is a compare-and-set UPDATE: concurrent processes cannot both move the same study, and
repeating a transition that already happened is a harmless no-op (idempotent).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from sqlalchemy import update
from sqlalchemy.orm import Session


class StudyState(str, enum.Enum):
    RECEIVING = "RECEIVING"
    STABLE = "STABLE"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    REPORTED = "REPORTED"
    EXPORTED = "EXPORTED"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


class ExportState(str, enum.Enum):
    PENDING = "PENDING"
    SENT = "SENT"
    DEAD = "DEAD"


class TurnState(str, enum.Enum):
    """A dialog turn: QUEUED when the API sent it, RUNNING in a worker, then DONE (answered) or FAILED."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


class ReportKind(str, enum.Enum):
    """How a report version came to be: the model's draft (version 1), a model answer made a version, a
    radiologist's typed text, or an approval (the only kind that is verified)."""

    AI_DRAFT = "ai_draft"
    AI_CORRECTION = "ai_correction"
    EDIT = "edit"
    APPROVAL = "approval"


class ErrorKind(str, enum.Enum):
    """Why a dialog turn failed, told apart by the exception's type where it happened and stored with the
    turn (``DialogTurn.error_kind``, sent with its error message too): the API answers from this, never from
    the message's words. NULL on turns that failed before the column existed (``api.dialog.error_status``)."""

    CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"  # the conversation does not fit the model's context (ContextTooLong)
    UNSUPPORTED_TASK = "UNSUPPORTED_TASK"  # the backend was not trained for the task (UnsupportedTask)
    NO_INPUT = "NO_INPUT"  # no report to talk about, or the image is missing or unusable (JobFailure)
    OUT_OF_MEMORY = "OUT_OF_MEMORY"  # torch.cuda.OutOfMemoryError
    CANCELLED = "CANCELLED"  # the model engine stopped under the turn (RequestCancelled: worker shutting down)
    MODEL_ERROR = "MODEL_ERROR"  # any other exception from the model
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"  # the API could not send the task
    WORKER_LOST = "WORKER_LOST"  # the reconciler found it RUNNING with its worker gone
    NOT_TAKEN = "NOT_TAKEN"  # the reconciler found it QUEUED too long: no worker took it


S = StudyState

#: Allowed moves. A late instance re-opens a study that has not been queued yet (or was skipped);
#: QUEUED/RUNNING -> QUEUED is the reconciler's re-queue; REPORTED <-> EXPORTED follows new versions.
ALLOWED: dict[StudyState, frozenset[StudyState]] = {
    S.RECEIVING: frozenset({S.STABLE}),
    S.STABLE: frozenset({S.QUEUED, S.SKIPPED, S.RECEIVING}),
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.QUEUED, S.REPORTED}),
    S.RUNNING: frozenset({S.REPORTED, S.FAILED, S.QUEUED}),
    S.REPORTED: frozenset({S.EXPORTED}),
    S.EXPORTED: frozenset({S.REPORTED}),
    S.SKIPPED: frozenset({S.QUEUED, S.RECEIVING}),
    S.FAILED: frozenset({S.QUEUED}),
}


def sources_of(target: StudyState) -> frozenset[StudyState]:
    """States from which ``target`` may be reached."""
    return frozenset(src for src, targets in ALLOWED.items() if target in targets)


def transition(
    session: Session,
    study_id: int,
    to: StudyState,
    reason: str | None = None,
    *,
    only_from: Iterable[StudyState] | None = None,
) -> bool:
    """Move a study to ``to`` if it is in an allowed source state; record the event.

    Returns True when this call made the move, False when the study was not in a source state
    (already moved by someone else, or the move is not allowed). The caller commits.
    ``only_from`` narrows the allowed sources further (e.g. the reconciler re-queues only RUNNING).
    """
    from radialog.registry.db import utcnow
    from radialog.registry.models import Study, StudyEvent

    allowed = sources_of(to)
    if only_from is not None:
        allowed = allowed & frozenset(only_from)
    if not allowed:
        return False
    current = session.get(Study, study_id)
    if current is None:
        raise LookupError(f"study {study_id} is not in the registry")
    from_state = current.state
    now = utcnow()
    result = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.state.in_([s.value for s in allowed]), Study.state == from_state)
        .values(state=to.value, reason=reason, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
        return False
    session.add(StudyEvent(study_id=study_id, from_state=from_state, to_state=to.value, reason=reason, at=now))
    session.flush()
    session.refresh(current)
    return True
