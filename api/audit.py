"""The audit log: one ``AuditEntry`` per read, question, change or approval, in the same transaction.

Details hold registry ids and versions only; the study's patient data stays in its own table.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.deps_types import Principal
from radialog.registry import AuditEntry, utcnow


def record(
    session: Session, who: Principal, action: str, study_id: int | None = None, **detail: Any
) -> None:
    session.add(AuditEntry(at=utcnow(), actor=who.name, role=who.role, action=action, study_id=study_id, detail=detail))
