"""Reports: the current version, all versions, the SR file, the image preview, new versions, approval."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from api import audit
from api.approvals import checked_verdicts, store_review
from api.deps import DB, AnyUser, AppServices, AppSettings, Radiologist
from api.imaging import preview_png, reported_instance
from api.lookups import get_study, get_version, require_report
from api.problems import Problem, Responses, problem_responses
from api.reports import new_version, report_out, send_exports
from api.schemas import Approval, NewVersion, ReportOut, ReportVersions, StudyId, Version
from radialog.registry import DialogTurn, ReportKind
from radialog.registry.queries import latest_report

router = APIRouter(prefix="/studies/{study_id}", tags=["reports"])
_READ = problem_responses(401, 403, 404, 409, 422)


@router.get("/report", response_model=ReportOut, responses=_READ)
def current_report(study_id: StudyId, session: DB, who: AnyUser) -> ReportOut:
    """The current (newest) version; ``verified`` is false until a radiologist approved it."""
    report = require_report(session, get_study(session, study_id))
    audit.record(session, who, "report.read", study_id, version=report.version)
    session.commit()
    return report_out(report)


_FHIR: Responses = {
    200: {
        "description": "FHIR R4 DiagnosticReport (contained Device and Observations)",
        "content": {"application/fhir+json": {}},
    }
}


@router.get("/report/fhir", responses={**_FHIR, **_READ})
def fhir_report(study_id: StudyId, session: DB, who: AnyUser, settings: AppSettings) -> Response:
    """The report as a FHIR R4 DiagnosticReport: the newest version a RIS or FHIR server is given
    (preliminary, final or amended; an unverified edit after an approval is not one of them)."""
    from reporting.channels.fhir import diagnostic_report
    from reporting.channels.outbox import study_view, version_view

    study = get_study(session, study_id)
    require_report(session, study)
    version = next((v for r in reversed(study.reports) if (v := version_view(session, settings, r)) is not None), None)
    if version is None:  # pragma: no cover - the first version is always sendable
        raise Problem(404, "no-report", "This study has no report version to show as FHIR.")
    resource = diagnostic_report(study_view(study), version)
    audit.record(session, who, "report.fhir", study_id, version=version.version)
    session.commit()
    return Response(json.dumps(resource), media_type="application/fhir+json")


@router.get("/report/versions", response_model=ReportVersions, responses=_READ)
def report_versions(study_id: StudyId, session: DB, who: AnyUser) -> ReportVersions:
    """Every version, oldest first (each SR references its predecessor), each with its word-level
    ``changes`` from that predecessor."""
    study = get_study(session, study_id)
    current = require_report(session, study)
    versions = [report_out(r, with_changes=True) for r in study.reports]
    audit.record(session, who, "report.versions", study_id)
    session.commit()
    return ReportVersions(study_id=study_id, current_version=current.version, versions=versions)


@router.get("/report/versions/{version}", response_model=ReportOut, responses=_READ)
def report_version(study_id: StudyId, version: Version, session: DB, who: AnyUser) -> ReportOut:
    get_study(session, study_id)
    report = get_version(session, study_id, version)
    audit.record(session, who, "report.read", study_id, version=version)
    session.commit()
    return report_out(report, with_changes=True)


_DICOM: Responses = {200: {"description": "The DICOM SR (Part 10 file)", "content": {"application/dicom": {}}}}


@router.get("/report/versions/{version}/sr", response_class=FileResponse, responses={**_DICOM, **_READ})
def download_sr(study_id: StudyId, version: Version, session: DB, who: AnyUser, settings: AppSettings) -> FileResponse:
    """The SR file of one version as written to the PACS."""
    get_study(session, study_id)
    report = get_version(session, study_id, version)
    path = Path(settings.sr_dir) / report.sr_path if report.sr_path else None
    if path is None or not path.is_file():
        raise Problem(409, "sr-missing", f"version {version} has no SR file")
    audit.record(session, who, "report.sr_download", study_id, version=version)
    session.commit()
    return FileResponse(path, media_type="application/dicom", filename=f"report-v{version}.dcm")


_PNG: Responses = {
    200: {"description": "The image as the model saw it (windowed, 8-bit)", "content": {"image/png": {}}}
}


@router.get("/image.png", response_class=Response, responses={**_PNG, **_READ})
def image_preview(study_id: StudyId, session: DB, who: AnyUser, settings: AppSettings) -> Response:
    """A PNG of the reported image with the model's windowing (MONOCHROME1 inverted)."""
    study = get_study(session, study_id)
    instance = reported_instance(session, study, latest_report(session, study_id))
    png = preview_png(settings, instance)
    audit.record(session, who, "image.read", study_id, instance=instance.id)
    session.commit()
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})  # patient data


_WRITE = problem_responses(401, 403, 404, 409, 422)


@router.post("/report/versions", response_model=ReportOut, status_code=201, responses=_WRITE)
def create_report_version(
    study_id: StudyId, body: NewVersion, session: DB, who: Radiologist, settings: AppSettings, services: AppServices
) -> ReportOut:
    """A corrected text (from a model answer: ``ai_correction``; typed: ``edit``) becomes a new,
    still unverified version with a new SR queued for export."""
    current = require_report(session, get_study(session, study_id))
    if body.source_turn_id is not None:
        turn = session.get(DialogTurn, body.source_turn_id)  # only the caller's own answer can become a version
        if turn is None or turn.conversation.study_id != study_id or turn.conversation.user != who.name:
            raise Problem(404, "turn-not-found", f"no dialog turn {body.source_turn_id} of yours for this study")
    report = new_version(
        session,
        settings,
        current,
        kind=body.kind,
        findings_text=body.findings_text,
        impression_text=body.impression_text,
        author=who.name,
        approve=False,
        base_version=body.base_version,
    )
    audit.record(
        session,
        who,
        "report.change",
        study_id,
        version=report.version,
        kind=body.kind,
        source_turn_id=body.source_turn_id,
    )
    session.commit()
    send_exports(services, report)
    return report_out(report)


@router.post("/report/approve", response_model=ReportOut, status_code=201, responses=_WRITE)
def approve_report(
    study_id: StudyId, body: Approval, session: DB, who: Radiologist, settings: AppSettings, services: AppServices
) -> ReportOut:
    """Sign the version on screen (radiologists only): a VERIFIED/FINAL version with the text of
    ``base_version`` exactly as the API shows it and the radiologist as verifying observer; its SR is
    queued for export. 409 when ``base_version`` is not current, when the findings or impression sent
    are not that version's text (nothing that was not displayed gets signed), or when it is signed."""
    from reporting.text import clean_text

    current = require_report(session, get_study(session, study_id))
    if body.base_version != current.version:
        raise Problem(
            409,
            "stale-version",
            f"version {body.base_version} is not the current version ({current.version}); show it first",
        )
    findings = clean_text(current.findings_text)  # the text as every channel shows it (rows before the rule)
    impression = clean_text(current.impression_text) if current.impression_text else None
    sent_impression = None if body.impression_text is None else (body.impression_text or None)
    if (body.findings_text is not None and body.findings_text != findings) or (
        body.impression_text is not None and sent_impression != (impression or None)
    ):
        raise Problem(
            409,
            "text-mismatch",
            f"the text sent is not the text of version {current.version}; "
            "save a change as a new version, then approve that version",
        )
    if current.verified:
        raise Problem(409, "already-approved", f"version {current.version} is already approved by {current.verifier}")
    verdicts = checked_verdicts(current, body.checklist)  # before anything is written
    report = new_version(
        session,
        settings,
        current,
        kind=ReportKind.APPROVAL.value,
        findings_text=findings,
        impression_text=impression or None,
        author=who.name,
        approve=True,
        base_version=body.base_version,
    )
    store_review(session, report, verdicts)  # the agreement data, in the approval's transaction
    audit.record(session, who, "report.approve", study_id, version=report.version)
    session.commit()
    send_exports(services, report)
    return report_out(report)
