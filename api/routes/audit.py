"""The audit log, for admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from api import audit
from api.deps import DB, Admin
from api.problems import problem_responses
from api.schemas import MAX_ID, NO_CONTROL_CHARACTERS, AuditOut, AuditPage, QueryInstant
from radialog.registry import AuditEntry

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=AuditPage, responses=problem_responses(401, 403, 422))
def read_audit(
    session: DB,
    who: Admin,
    study_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    actor: Annotated[str | None, Query(max_length=128, pattern=NO_CONTROL_CHARACTERS)] = None,
    action: Annotated[str | None, Query(max_length=64, pattern=NO_CONTROL_CHARACTERS)] = None,
    since: Annotated[QueryInstant | None, Query()] = None,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """Who read, asked, changed or approved which study, newest first."""
    query = select(AuditEntry)
    if study_id is not None:
        query = query.where(AuditEntry.study_id == study_id)
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if action:
        query = query.where(AuditEntry.action == action)
    if since:
        query = query.where(AuditEntry.at >= since)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(AuditEntry.id.desc()).offset(offset).limit(limit))
    items = [AuditOut.model_validate(r) for r in rows]
    audit.record(session, who, "audit.read", study_id)
    session.commit()
    return AuditPage(items=items, total=total, offset=offset, limit=limit)
