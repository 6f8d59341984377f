"""Report versions: the AI draft (once per study and model version) and every radiologist version.

Each version is a Report row, an SR file under ``settings.sr_dir`` (written durably: temp file, fsync,
rename) and one PENDING Export row per configured destination. The caller owns the session and commits:
nothing leaves the building (the outbox is read only after commit), so a rolled-back version is never sent.

The AI draft's SOP Instance UID is derived from study + model name + model version. Its Report row is
inserted with ON CONFLICT DO NOTHING *before* the file is written, so when two workers race for the same
draft, the one that loses the insert returns the winner's row and never writes a second, different file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from radialog.logging import get_logger, uid_ref
from radialog.registry import Instance, Report, ReportKind, Study, StudyState, transition, utcnow
from radialog.registry.queries import latest_report
from radialog.settings import Settings
from reporting import sr as srmod

if TYPE_CHECKING:
    from radialog.model_output import Provenance, ReportOutput

log = get_logger(__name__)

#: Kinds of version ``create_version`` makes (the AI draft is ``ai_draft``).
VERSION_KINDS = frozenset({ReportKind.AI_CORRECTION.value, ReportKind.EDIT.value, ReportKind.APPROVAL.value})
#: SR series numbers start here; version N is series SERIES_BASE + N.
SERIES_BASE = 900


class ReportingError(RuntimeError):
    """A version cannot be made (no source image on disk, no earlier version to revise, ...)."""


def _source_instance(session: Session, study: Study, sop_instance_uid: str | None = None) -> Instance:
    if sop_instance_uid:
        instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).first()
    else:
        instance = study.selected_instance or (study.instances[0] if study.instances else None)
    if instance is None:
        raise ReportingError(f"study {study.id} has no source image in the registry")
    return instance


def _source_header(settings: Settings, instance: Instance) -> Any:
    path = settings.spool_dir / instance.path
    if not path.is_file():
        raise ReportingError(f"source image of instance {instance.id} is missing from the spool")
    return srmod.read_source_header(path)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_sr(settings: Settings, study_uid: str, dataset: Any) -> str:
    """Write the SR under sr_dir/<study>/<sop>.dcm; returns the path relative to sr_dir."""
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    relative = Path(study_uid) / f"{dataset.SOPInstanceUID}.dcm"
    write_durably(settings.sr_dir / relative, buffer.getvalue())
    return relative.as_posix()


def _add_exports(session: Session, settings: Settings, report: Report, now: datetime) -> None:
    """The version's outbox rows, one per destination that takes it (``reporting.channels.outbox``)."""
    from reporting.channels.outbox import add_version_rows

    session.flush()
    add_version_rows(session, settings, report, now)


def routing_notes(study: Study) -> tuple[str, ...]:
    """What the routing decision asks every unverified version to say (e.g. the patient's age is unknown)."""
    return tuple(str(n) for n in ((study.routing or {}).get("notes") or []))


def _predecessors(study_uid: str, report: Report | None) -> list[srmod.Predecessor]:
    if report is None:
        return []
    return [srmod.Predecessor(study_uid, report.series_instance_uid, report.sop_instance_uid)]


def _coded(findings: list[Any]) -> list[srmod.CodedFinding]:
    return [srmod.CodedFinding(str(f["label"]), float(f["probability"]), bool(f["present"])) for f in findings or []]


def _insert_once(session: Session, values: dict[str, Any]) -> int | None:
    """INSERT the report unless its SOP Instance UID exists; the new id, or None when it existed."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    insert: Callable[[type[Report]], Any]  # both dialects' INSERT ... ON CONFLICT DO NOTHING
    if dialect == "postgresql":
        insert = postgresql.insert
    elif dialect == "sqlite":
        insert = sqlite.insert
    else:  # pragma: no cover - only the two supported databases
        raise ReportingError(f"unsupported database {dialect}")
    statement = (
        insert(Report)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[Report.sop_instance_uid])
        .returning(Report.id)
    )
    return session.execute(statement).scalar_one_or_none()


def _move_to_reported(session: Session, study_id: int, reason: str) -> None:
    if not transition(session, study_id, StudyState.REPORTED, reason):
        study = session.get(Study, study_id)
        state = study.state if study else None
        if state != StudyState.REPORTED.value:
            log.warning("study not moved to REPORTED", extra={"study": study_id, "state": state})


def create_ai_draft(
    session: Session, settings: Settings, study_id: int, output: ReportOutput, provenance: Provenance
) -> Report:
    """The AI draft of a study for one model version, made once; a repeat returns the existing Report."""
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study {study_id} is not in the registry")
    sop_uid, series_uid = srmod.ai_draft_uids(study.study_instance_uid, provenance.name, provenance.version)
    existing = session.scalars(select(Report).where(Report.sop_instance_uid == sop_uid)).first()
    if existing is not None:
        return existing

    instance = _source_instance(session, study)
    source = _source_header(settings, instance)
    previous = latest_report(session, study_id)
    version = (previous.version + 1) if previous else 1
    findings = [
        {"label": f.label, "probability": float(f.probability), "present": bool(f.present)} for f in output.findings
    ]
    spec = srmod.SRSpec(
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid,
        series_number=SERIES_BASE + version,
        instance_number=1,
        findings_text=output.findings_text,
        impression_text=getattr(output, "impression_text", None),
        findings=_coded(findings),
        algorithm=srmod.Algorithm(
            provenance.name,
            provenance.version,
            provenance.files_sha256,
            test_model=bool(getattr(provenance, "tiny", False)),
            display_name=getattr(provenance, "display_name", ""),
        ),
        predecessors=_predecessors(study.study_instance_uid, previous),
        institution_name=settings.institution_name,
        notes=routing_notes(study),
    )
    srmod.validate_spec(spec)  # invalid text is refused before anything is stored (workers clean model text)
    now = utcnow()
    report_id = _insert_once(
        session,
        {
            "study_id": study_id,
            "version": version,
            "kind": ReportKind.AI_DRAFT.value,
            "predecessor_id": previous.id if previous else None,
            "sop_instance_uid": sop_uid,
            "series_instance_uid": series_uid,
            "source_instance_uid": instance.sop_instance_uid,
            "findings_text": output.findings_text,
            "impression_text": getattr(output, "impression_text", None),
            "findings": findings,
            "author": provenance.name,
            "verified": False,
            "model_name": provenance.name,
            "model_version": provenance.version,
            "model_hash": provenance.files_sha256[:64],
            "timings": dict(output.timings),
            "created_at": now,
        },
    )
    if report_id is None:  # another process made this draft first: its row and file stand
        return session.scalars(select(Report).where(Report.sop_instance_uid == sop_uid)).one()

    sr_path = _write_sr(settings, study.study_instance_uid, srmod.build_sr(source, spec))
    report = session.get(Report, report_id)
    assert report is not None
    report.sr_path = sr_path
    _add_exports(session, settings, report, now)
    _move_to_reported(session, study_id, f"AI draft version {version} by {provenance.name} {provenance.version}")
    session.flush()
    log.info(
        "AI draft created",
        extra={"study": study_id, "report": report_id, "version": version, "sr": uid_ref(sop_uid)},
    )
    return report


def create_version(
    session: Session,
    settings: Settings,
    study_id: int,
    *,
    kind: str,
    findings_text: str,
    impression_text: str | None,
    author: str,
    approve: bool = False,
) -> Report:
    """A radiologist's version on top of the latest one: new UIDs, predecessor = the latest version.

    ``approve`` makes it VERIFIED / FINAL with ``author`` as verifying observer for
    ``settings.institution_name``; otherwise it stays unverified and preliminary.
    """
    if kind not in VERSION_KINDS:
        raise ValueError(f"kind must be one of {sorted(VERSION_KINDS)}, not {kind!r}")
    if not author:
        raise ValueError("a version needs its author")
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study {study_id} is not in the registry")
    previous = latest_report(session, study_id)
    if previous is None:
        raise ReportingError(f"study {study_id} has no report to revise")
    instance = _source_instance(session, study, previous.source_instance_uid)
    source = _source_header(settings, instance)
    now = utcnow()
    algorithm = (
        srmod.Algorithm(previous.model_name, previous.model_version or "", previous.model_hash or "")
        if previous.model_name
        else None
    )
    spec = srmod.SRSpec(
        sop_instance_uid=srmod.new_uid(),
        series_instance_uid=srmod.new_uid(),
        series_number=SERIES_BASE + previous.version + 1,
        instance_number=1,
        findings_text=findings_text,
        impression_text=impression_text,
        # The classifier's coded findings belong to the AI's documents: a radiologist's version (an edit or
        # a signature) must not carry AI "present" codes that its own text may deny.
        findings=_coded(previous.findings) if kind == ReportKind.AI_CORRECTION.value and not approve else (),
        algorithm=algorithm,
        author=author,
        verification=srmod.Verification(author, settings.institution_name, now) if approve else None,
        predecessors=_predecessors(study.study_instance_uid, previous),
        institution_name=settings.institution_name,
        notes=() if approve else routing_notes(study),
    )
    srmod.validate_spec(spec)  # refused before the row exists: the text stored is the text written
    report = Report(
        study_id=study_id,
        version=previous.version + 1,
        kind=kind,
        predecessor_id=previous.id,
        sop_instance_uid=spec.sop_instance_uid,
        series_instance_uid=spec.series_instance_uid,
        source_instance_uid=instance.sop_instance_uid,
        findings_text=findings_text,
        impression_text=impression_text,
        findings=list(previous.findings or []),
        author=author,
        verified=approve,
        verifier=author if approve else None,
        verified_at=now if approve else None,
        model_name=previous.model_name,
        model_version=previous.model_version,
        model_hash=previous.model_hash,
        timings={},
        created_at=now,
    )
    session.add(report)
    session.flush()  # the (study, version) unique key stops two concurrent versions here, before any file
    report.sr_path = _write_sr(settings, study.study_instance_uid, srmod.build_sr(source, spec))
    _add_exports(session, settings, report, now)
    _move_to_reported(session, study_id, f"report version {report.version} ({kind}) by {author}")
    session.flush()
    log.info(
        "report version created",
        extra={"study": study_id, "report": report.id, "version": report.version, "kind": kind, "verified": approve},
    )
    return report
