"""Registry look-ups shared by the routes, raising the API's problem details when a row is missing."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.problems import Problem
from radialog.registry import Report, Study
from radialog.registry.queries import latest_report


def get_study(session: Session, study_id: int) -> Study:
    study = session.get(Study, study_id)
    if study is None:
        raise Problem(404, "study-not-found", f"no study with id {study_id}")
    return study


def require_report(session: Session, study: Study) -> Report:
    """The current (highest) version, or 409 when the model has not reported the study yet."""
    report = latest_report(session, study.id)
    if report is None:
        raise Problem(409, "not-reported", f"study {study.id} has no report yet (state {study.state})")
    return report


def get_version(session: Session, study_id: int, version: int) -> Report:
    report = session.scalar(select(Report).where(Report.study_id == study_id, Report.version == version))
    if report is None:
        raise Problem(404, "version-not-found", f"study {study_id} has no report version {version}")
    return report
