"""Registry questions more than one role asks, answered once (the API's routes, the exporter, the dialog
worker and the reporting package would otherwise each spell the query, and drift)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from radialog.registry.models import Report


def latest_report(session: Session, study_id: int) -> Report | None:
    """The newest version of a study's report (the highest ``version``: the current one), or None."""
    return session.scalars(
        select(Report).where(Report.study_id == study_id).order_by(Report.version.desc()).limit(1)
    ).first()
