"""The audit log: one ``AuditEntry`` per read, question, change, approval or refusal, in the same transaction.

Details hold registry ids and versions only; the study's patient data stays in its own table. A request
about a study that does not exist (or an id no study can have) is still audited: the entry's study is
then empty and the id as sent is kept in the detail, so writing the entry can never fail on the foreign
key or on the column's range.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.deps_types import Principal
from api.schemas import MAX_ID  # the largest id a registry row can have (PostgreSQL INTEGER)
from radialog.registry import AuditEntry, Study, utcnow

#: A requested id kept in an entry's detail is cut to this many characters.
MAX_REQUESTED_CHARS = 32


def record(session: Session, who: Principal, action: str, study_id: int | None = None, **detail: Any) -> None:
    """Add the entry to ``session`` (the caller commits it with the read or change it records)."""
    if study_id is not None and not (1 <= study_id <= MAX_ID and session.get(Study, study_id) is not None):
        detail = {**detail, "requested_study": str(study_id)[:MAX_REQUESTED_CHARS]}
        study_id = None
    session.add(AuditEntry(at=utcnow(), actor=who.name, role=who.role, action=action, study_id=study_id, detail=detail))


def record_refusal(session: Session, who: Principal, action: str, raw_study_id: str | None, **detail: Any) -> None:
    """Audit a refused request whose study id is the path value as sent (not validated yet): any text."""
    if raw_study_id is not None and raw_study_id.isascii() and raw_study_id.isdigit() and len(raw_study_id) <= 10:
        record(session, who, action, int(raw_study_id), **detail)
        return
    if raw_study_id is not None:
        detail = {**detail, "requested_study": raw_study_id[:MAX_REQUESTED_CHARS]}
    record(session, who, action, None, **detail)
