"""Outbox rows for every channel kind, and what a row carries when it is sent.

Made in the caller's transaction (with the version, or with the failure that causes an event), so nothing
leaves before it is committed. Per report version and destination kind:

- ``dimse`` / ``stow``: the SR, every version (as before channels existed);
- ``hl7`` / ``fhir``: the version when ``base.result_status`` gives it a status (not an unverified
  version after an approval);
- ``webhook``: ``study.reported`` for an AI draft, ``report.approved`` for an approval, each when the
  destination subscribes to it; ``study.failed`` (a report job failed for good) and ``export.dead`` (a
  delivery to another kind of destination gave up) are rows of their own, without a version.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from radialog.registry import Export, ExportState, Report, ReportKind, Study
from radialog.settings import Destination, Settings
from reporting.channels.base import Delivery, ResultStatus, StudyView, VersionView, result_status
from reporting.channels.webhook import event_body
from reporting.sr import read_status_line

#: The webhook event a version of this kind raises.
VERSION_EVENTS = {ReportKind.AI_DRAFT.value: "study.reported", ReportKind.APPROVAL.value: "report.approved"}
#: Kinds of version whose SR carries the classifier's coded findings (``versions.create_version``).
_CODED_KINDS = {ReportKind.AI_DRAFT.value, ReportKind.AI_CORRECTION.value}


def approved_before(session: Session, report: Report) -> bool:
    """Whether an earlier version of the study was approved."""
    return bool(
        session.scalar(
            select(
                exists().where(
                    Report.study_id == report.study_id, Report.version < report.version, Report.verified.is_(True)
                )
            )
        )
    )


def status_of(session: Session, report: Report) -> ResultStatus | None:
    return result_status(bool(report.verified), approved_before(session, report))


def _row(
    destination: Destination,
    now: datetime,
    *,
    report_id: int | None,
    study_id: int | None,
    event: str | None = None,
    payload: dict[str, Any] | None = None,
) -> Export:
    return Export(
        report_id=report_id,
        study_id=study_id,
        destination=destination.name,
        event=event,
        payload=payload,
        state=ExportState.PENDING.value,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )


def _version_data(study: Study, report: Report, status: ResultStatus | None) -> dict[str, Any]:
    from reporting.channels.base import FHIR_STATUS

    return {
        "study": {"id": study.id, "study_instance_uid": study.study_instance_uid, "priority": study.priority},
        "report": {
            "version": report.version,
            "kind": report.kind,
            "verified": bool(report.verified),
            "status": FHIR_STATUS[status] if status else None,
            "sop_instance_uid": report.sop_instance_uid,
            "model": report.model_name,
        },
    }


def add_version_rows(session: Session, settings: Settings, report: Report, now: datetime) -> list[Export]:
    """One PENDING row per destination that takes this version (see the module docstring)."""
    study = session.get(Study, report.study_id)
    assert study is not None
    status = status_of(session, report)
    rows = []
    for destination in settings.destinations:
        if destination.carries_sr:
            rows.append(_row(destination, now, report_id=report.id, study_id=study.id))
        elif destination.kind in ("hl7", "fhir"):
            if status is not None:
                rows.append(_row(destination, now, report_id=report.id, study_id=study.id))
        elif destination.kind == "webhook":
            event = VERSION_EVENTS.get(report.kind)
            if event and event in destination.events:
                rows.append(
                    _row(
                        destination,
                        now,
                        report_id=report.id,
                        study_id=study.id,
                        event=event,
                        payload=event_body(event, now, _version_data(study, report, status)),
                    )
                )
    session.add_all(rows)
    return rows


def add_event_rows(
    session: Session, settings: Settings, event: str, study_id: int | None, data: dict[str, Any], now: datetime
) -> list[Export]:
    """A study.failed / export.dead event for every webhook destination subscribed to it."""
    rows = []
    for destination in settings.destinations:
        if destination.kind == "webhook" and event in destination.events:
            rows.append(
                _row(
                    destination,
                    now,
                    report_id=None,
                    study_id=study_id,
                    event=event,
                    payload=event_body(event, now, data),
                )
            )
    session.add_all(rows)
    return rows


def study_failed(session: Session, settings: Settings, study_id: int, reason: str, now: datetime) -> list[Export]:
    """Rows for ``study.failed`` (called in the transaction that fails the study)."""
    study = session.get(Study, study_id)
    data = {
        "study": {"id": study_id, "study_instance_uid": study.study_instance_uid if study else None},
        "reason": reason[:500],
    }
    return add_event_rows(session, settings, "study.failed", study_id, data, now)


def export_dead(session: Session, settings: Settings, export: Export, reason: str, now: datetime) -> list[Export]:
    """Rows for ``export.dead`` when a delivery to a non-webhook destination gives up (never for a webhook
    row: a dead receiver is not told about itself, and no event can cascade into more events)."""
    destination = next((d for d in settings.destinations if d.name == export.destination), None)
    if export.event is not None or (destination is not None and destination.kind == "webhook"):
        return []
    report = session.get(Report, export.report_id) if export.report_id else None
    study_id = export.study_id or (report.study_id if report else None)
    data = {
        "export": {
            "id": export.id,
            "destination": export.destination,
            "kind": destination.kind if destination else None,
            "attempts": export.attempts,
            "reason": reason[:500],
        },
        "study": {"id": study_id},
        "report": {"version": report.version, "kind": report.kind} if report else None,
    }
    return add_event_rows(session, settings, "export.dead", study_id, data, now)


def study_view(study: Study) -> StudyView:
    return StudyView(
        id=study.id,
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        study_date=study.study_date,
        study_description=study.study_description,
    )


def version_view(session: Session, settings: Settings, report: Report) -> VersionView | None:
    """The version as HL7 and FHIR carry it; None when it is not sent (unverified after an approval)."""
    status = status_of(session, report)
    if status is None:
        return None
    return VersionView(
        id=report.id,
        version=report.version,
        kind=report.kind,
        status=status,
        findings_text=report.findings_text,
        impression_text=report.impression_text,
        findings=list(report.findings or []),
        coded=report.kind in _CODED_KINDS and not report.verified,
        author=report.author,
        verifier=report.verifier,
        verified_at=report.verified_at,
        created_at=report.created_at,
        sop_instance_uid=report.sop_instance_uid,
        model_name=report.model_name,
        model_version=report.model_version,
        model_hash=report.model_hash,
        status_line=read_status_line(settings.sr_dir / (report.sr_path or "")),
    )


def delivery_of(session: Session, settings: Settings, export: Export) -> Delivery:
    """What one row sends (read when it is claimed; versions and event bodies never change)."""
    report = session.get(Report, export.report_id) if export.report_id else None
    study_id = export.study_id or (report.study_id if report else None)
    study = session.get(Study, study_id) if study_id else None
    version = version_view(session, settings, report) if report is not None and export.event is None else None
    return Delivery(
        export_id=export.id,
        study=study_view(study) if study else None,
        version=version,
        event=export.event,
        payload=export.payload,
    )
