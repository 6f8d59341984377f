"""Report views and new versions: rendering through ``reporting.render``, versions through
``reporting.versions``, and sending the new SR's export tasks.

The reporting package owns the SR and the outbox; here we only translate between it and the API.
"""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.problems import Problem
from api.schemas import DiffPart, ExportOut, ReportOut, VersionChanges
from api.services import Services
from radialog.logging import get_logger
from radialog.registry import ExportState, Report
from radialog.settings import Settings

log = get_logger(__name__)


def changes_from_predecessor(report: Report) -> VersionChanges | None:
    """Word-level changes of findings and impression from the version this one replaced."""
    from reporting.diff import word_diff
    from reporting.text import clean_text

    previous = report.predecessor
    if previous is None:
        return None

    def parts(old: str | None, new: str | None) -> list[DiffPart]:
        return [DiffPart(op=op, text=text) for op, text in word_diff(clean_text(old or ""), clean_text(new or ""))]

    return VersionChanges(
        predecessor_version=previous.version,
        findings=parts(previous.findings_text, report.findings_text),
        impression=parts(previous.impression_text, report.impression_text),
    )


def report_out(report: Report, *, with_changes: bool = False) -> ReportOut:
    from reporting.render import report_json, report_text

    sr_url = f"/api/v1/studies/{report.study_id}/report/versions/{report.version}/sr" if report.sr_path else None
    return ReportOut(
        id=report.id,
        study_id=report.study_id,
        version=report.version,
        kind=report.kind,
        author=report.author,
        verified=report.verified,
        verifier=report.verifier,
        verified_at=report.verified_at,
        created_at=report.created_at,
        findings_text=report.findings_text,
        impression_text=report.impression_text,
        text=report_text(report),
        document=report_json(report),
        sr_url=sr_url,
        exports=[ExportOut.model_validate(e) for e in report.exports],
        changes=changes_from_predecessor(report) if with_changes else None,
    )


def new_version(
    session: Session,
    settings: Settings,
    current: Report,
    *,
    kind: str,
    findings_text: str,
    impression_text: str | None,
    author: str,
    approve: bool,
    base_version: int | None,
) -> Report:
    """A new version after ``current``; 409 when the client edited an older version, 422 when the text
    cannot be written into an SR (``reporting.text``; the schemas refuse such text earlier)."""
    from reporting.text import InvalidReportText
    from reporting.versions import ReportingError, create_version

    if base_version is not None and base_version != current.version:
        raise Problem(409, "stale-version", f"version {base_version} is no longer current (current: {current.version})")
    try:
        return create_version(
            session,
            settings,
            current.study_id,
            kind=kind,
            findings_text=findings_text,
            impression_text=impression_text,
            author=author,
            approve=approve,
        )
    except IntegrityError as exc:  # another version of this study was created at the same moment
        session.rollback()
        raise Problem(409, "stale-version", "another version was saved meanwhile; reload and retry") from exc
    except InvalidReportText as exc:  # e.g. a user name with a backslash cannot be the SR's observer
        session.rollback()
        raise Problem(422, "invalid-report-text", str(exc)) from exc
    except ReportingError as exc:  # e.g. the source image is gone from the spool: no SR can be built
        session.rollback()
        raise Problem(409, "cannot-build-report", str(exc)) from exc


def send_exports(services: Services, report: Report) -> int:
    """Send one "radialog.export" task per PENDING export of ``report``; the outbox sweeper covers
    any that cannot be sent now (broker down), so a failure here is logged, not raised."""
    sent = 0
    for export in report.exports:
        if export.state != ExportState.PENDING.value:
            continue
        try:
            services.send_exports([export.id])
            sent += 1
        except Exception:
            log.exception("export task not sent; the outbox sweeper will retry", extra={"export": export.id})
    return sent
