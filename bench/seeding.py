"""Seeding a registry and a spool as the node would have left them: studies, users, AI drafts.

Benchmarks and tests share it (tests import it through ``tests.support.seeding``; bench never imports the
tests). Rows and spool files are real; AI drafts are written by ``reporting.versions.create_ai_draft``, the
call the workers make. Two ways to add a study, named by what they leave behind:

- ``add_study``: moved to its state through the state machine (``transition``), so its history is there,
  as the API's views, the worklist and the audit expect;
- ``add_study_without_history``: written straight in the given state (no transition rows), for the
  reporting and export code that only reads the study, its selected instance and the spooled file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from radialog.chexpert import CHEXPERT_LABELS
from radialog.model_output import ClassifierFinding, Provenance, ReportOutput
from radialog.registry import Instance, Registry, Study, StudyState, transition, utcnow
from radialog.settings import Settings
from radialog.synthetic import make_cxr

USERS = {"reader": "reader", "rad": "radiologist", "admin": "admin"}


def make_keys(registry: Registry) -> dict[str, str]:
    """One user per role (names: reader, rad, admin); returns name -> key."""
    from api.users import create_user

    with registry.session() as session:
        return {name: create_user(session, name, role) for name, role in USERS.items()}


def _spool_and_insert(
    session: Session,
    settings: Settings,
    ds: Dataset,
    state: StudyState,
    *,
    attributes: dict[str, Any],
    study_description: str | None = None,
    calling_ae_title: str | None = None,
) -> int:
    """``ds`` saved in the spool as the node stores it, its study row in ``state`` and its instance row,
    selected for reporting. Returns the study id."""
    relative = Path(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    path = settings.spool_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    now = utcnow()
    study = Study(
        study_instance_uid=ds.StudyInstanceUID,
        state=state.value,
        patient_name=str(ds.PatientName),
        patient_id=ds.PatientID,
        accession_number=ds.AccessionNumber,
        study_date=ds.StudyDate,
        study_description=study_description,
        created_at=now,
        updated_at=now,
        last_instance_at=now,
    )
    session.add(study)
    session.flush()
    instance = Instance(
        study_id=study.id,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        series_instance_uid=ds.SeriesInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        path=relative.as_posix(),
        size_bytes=path.stat().st_size,
        calling_ae_title=calling_ae_title,
        received_at=now,
        attributes=attributes,
    )
    session.add(instance)
    session.flush()
    study.selected_instance_id = instance.id
    return study.id


def add_study(
    registry: Registry,
    settings: Settings,
    *,
    state: StudyState = StudyState.QUEUED,
    index: int = 0,
    study_date: str | None = None,
    reason: str | None = None,
) -> tuple[int, Dataset]:
    """A study with one CR instance in the spool (as the node stores it), moved to ``state`` through
    the state machine. Returns (study id, dataset)."""
    ds = make_cxr(patient_index=index, rows=256, cols=256, seed=index)
    if study_date:
        ds.StudyDate = study_date
    with registry.session() as session:
        study_id = _spool_and_insert(
            session,
            settings,
            ds,
            StudyState.RECEIVING,
            study_description=ds.StudyDescription,
            calling_ae_title="TESTSCU",
            attributes={
                "modality": "CR",
                "view_position": "PA",
                "body_part_examined": "CHEST",
                "sop_class_uid": ds.SOPClassUID,
                "photometric_interpretation": "MONOCHROME2",
                "rows": 256,
                "columns": 256,
            },
        )
        path_to = {
            StudyState.RECEIVING: [],
            StudyState.STABLE: [StudyState.STABLE],
            StudyState.QUEUED: [StudyState.STABLE, StudyState.QUEUED],
            StudyState.RUNNING: [StudyState.STABLE, StudyState.QUEUED, StudyState.RUNNING],
            StudyState.FAILED: [StudyState.STABLE, StudyState.QUEUED, StudyState.RUNNING, StudyState.FAILED],
            StudyState.SKIPPED: [StudyState.STABLE, StudyState.SKIPPED],
        }[state]
        for step in path_to:
            transition(session, study_id, step, reason if step == state else None)
        return study_id, ds


def add_reported_study(
    registry: Registry,
    settings: Settings,
    *,
    index: int = 0,
    findings_text: str = "The heart size is normal. There is a small left pleural effusion.",
    present: tuple[str, ...] = ("Pleural Effusion",),
) -> int:
    """A study with an AI draft (version 1) written by reporting.versions.create_ai_draft."""
    from reporting.versions import create_ai_draft
    from workers.models.prompts import findings_phrase

    study_id, _ = add_study(registry, settings, state=StudyState.RUNNING, index=index)
    findings = [
        ClassifierFinding(label, 0.9 if label in present else 0.1, label in present) for label in CHEXPERT_LABELS
    ]
    output = ReportOutput(
        key=str(study_id),
        findings_text=findings_text,
        findings=findings,
        findings_phrase=findings_phrase(present),
        generated_tokens=20,
        timings={"generate": 0.1},
    )
    provenance = Provenance(
        name="RaDialog-LLaVA", version="2.0-test", files_sha256="0" * 64, tiny=True, display_name="RaDialog"
    )
    with registry.session() as session:
        create_ai_draft(session, settings, study_id, output, provenance)
    return study_id


#: The reporting tests' findings text and provenance (``model_output``).
FINDINGS_TEXT = "The cardiac silhouette is enlarged. There is a small left pleural effusion. No pneumothorax."
PROVENANCE = Provenance(name="RaDialog-LLaVA", version="2.0", files_sha256="5e" * 32, display_name="RaDialog")


def add_study_without_history(
    registry: Registry, settings: Settings, *, state: StudyState = StudyState.RUNNING
) -> tuple[int, Dataset]:
    """A CR chest study with one 128x128 image, spooled as the node would and selected for reporting, its row
    written directly in ``state`` (no transitions). Returns (study id, dataset)."""
    ds = make_cxr(modality="CR", rows=128, cols=128)
    with registry.session() as session:
        study_id = _spool_and_insert(
            session,
            settings,
            ds,
            state,
            attributes={"modality": "CR", "view_position": "PA", "body_part_examined": "CHEST"},
        )
        return study_id, ds


def model_output(study_id: int, text: str = FINDINGS_TEXT) -> ReportOutput:
    """A model's output for ``study_id``: ``text``, cardiomegaly and pleural effusion present."""
    present = {"Cardiomegaly", "Pleural Effusion"}
    findings = [
        ClassifierFinding(label, 0.9 if label in present else round(0.02 * (i + 1), 2), label in present)
        for i, label in enumerate(CHEXPERT_LABELS)
    ]
    return ReportOutput(
        key=str(study_id),
        findings_text=text,
        findings=findings,
        findings_phrase="Predicted Findings: cardiomegaly, pleural effusion.",
        generated_tokens=24,
        timings={"generate": 0.5},
    )
