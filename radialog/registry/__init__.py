"""The study registry: the single source of truth for every study, job, report and export.

SQLAlchemy 2 models (``models``), the state machine (``states``), engine/session set-up (``db``) and
Alembic migrations (``migrations/``). SQLite in WAL mode by default, PostgreSQL by URL.
"""

from radialog.registry.db import Registry, utcnow
from radialog.registry.models import (
    ApiKey,
    ApprovalReview,
    AuditEntry,
    Base,
    Conversation,
    DialogTurn,
    Export,
    FindingVerdict,
    Instance,
    Job,
    Report,
    Study,
    StudyEvent,
)
from radialog.registry.states import ErrorKind, ExportState, JobState, ReportKind, StudyState, TurnState, transition
from radialog.registry.types import UTCDateTime

__all__ = [
    "ApiKey",
    "ApprovalReview",
    "AuditEntry",
    "Base",
    "Conversation",
    "DialogTurn",
    "ErrorKind",
    "Export",
    "ExportState",
    "FindingVerdict",
    "Instance",
    "Job",
    "JobState",
    "Registry",
    "Report",
    "ReportKind",
    "Study",
    "StudyEvent",
    "StudyState",
    "TurnState",
    "UTCDateTime",
    "transition",
    "utcnow",
]
