"""Report versions in the registry (SQLite and PostgreSQL): the AI draft once, radiologist versions, renderings."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from radialog.registry import Export, Registry, Report, Study, StudyState, transition
from radialog.settings import Destination, Settings
from reporting.render import UNVERIFIED_HEADING, VERIFIED_HEADING, report_json, report_text
from reporting.versions import ReportingError, create_ai_draft, create_version
from tests.support.seeding import FINDINGS_TEXT, PROVENANCE, add_study_without_history, model_output


@pytest.fixture
def two_destinations(settings: Settings) -> Settings:
    settings.destinations = [
        Destination(name="pacs", ae_title="PACS", port=104),
        Destination(name="archive", ae_title="ARCH", port=105),
    ]
    return settings


def test_ai_draft_is_made_once(registry: Registry, two_destinations: Settings) -> None:
    settings = two_destinations
    study_id, _ = add_study_without_history(registry, settings)
    with registry.session() as session:
        first = create_ai_draft(session, settings, study_id, model_output(study_id), PROVENANCE)
    with registry.session() as session:  # the job ran again (redelivered task): same draft, nothing new
        again = create_ai_draft(session, settings, study_id, model_output(study_id, "a different text"), PROVENANCE)
    assert again.id == first.id and again.sop_instance_uid == first.sop_instance_uid
    files = list(settings.sr_dir.rglob("*.dcm"))
    assert [p.name for p in files] == [f"{first.sop_instance_uid}.dcm"]
    assert dcmread(files[0]).SOPInstanceUID == first.sop_instance_uid
    with registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Report)) == 1
        exports = session.scalars(select(Export).order_by(Export.destination)).all()
        assert [(e.destination, e.state, e.report_id) for e in exports] == [
            ("archive", "PENDING", first.id),
            ("pacs", "PENDING", first.id),
        ]
        study = session.get(Study, study_id)
        assert study.state == "REPORTED"
        report = session.get(Report, first.id)
        assert (report.version, report.kind, report.verified, report.author) == (1, "ai_draft", False, PROVENANCE.name)
        assert report.findings_text == FINDINGS_TEXT and report.model_hash == PROVENANCE.files_sha256
        assert {f["label"] for f in report.findings if f["present"]} == {"Cardiomegaly", "Pleural Effusion"}


def test_correction_then_approval_makes_a_chain_of_versions(registry: Registry, two_destinations: Settings) -> None:
    settings = two_destinations
    study_id, _ = add_study_without_history(registry, settings)
    with registry.session() as session:
        draft = create_ai_draft(session, settings, study_id, model_output(study_id), PROVENANCE)
        transition(session, study_id, StudyState.EXPORTED, "test: the draft reached every destination")
    with registry.session() as session:
        corrected = create_version(
            session,
            settings,
            study_id,
            kind="ai_correction",
            findings_text="Cardiomegaly. No effusion.",
            impression_text=None,
            author="anna",
        )
        assert session.get(Study, study_id).state == "REPORTED"  # a new version must be exported again
    with registry.session() as session:
        approved = create_version(
            session,
            settings,
            study_id,
            kind="approval",
            findings_text="Cardiomegaly. No effusion.",
            impression_text="Cardiomegaly.",
            author="anna",
            approve=True,
        )
    with registry.session() as session:
        v1, v2, v3 = session.scalars(select(Report).order_by(Report.version)).all()
        assert [r.id for r in (v1, v2, v3)] == [draft.id, corrected.id, approved.id]
        assert (v2.predecessor_id, v3.predecessor_id) == (v1.id, v2.id)
        assert (v2.kind, v2.verified, v2.author) == ("ai_correction", False, "anna")
        assert (v3.verified, v3.verifier) == (True, "anna") and v3.verified_at is not None
        assert len({v1.sop_instance_uid, v2.sop_instance_uid, v3.sop_instance_uid}) == 3
        assert v3.findings == v1.findings  # the classifier output travels with every version
        assert session.scalar(select(func.count()).select_from(Export)) == 6

        sr2, sr3 = dcmread(settings.sr_dir / v2.sr_path), dcmread(settings.sr_dir / v3.sr_path)
        assert (sr2.VerificationFlag, sr2.PreliminaryFlag) == ("UNVERIFIED", "PRELIMINARY")
        assert "not verified" in sr2.SeriesDescription
        assert (sr3.VerificationFlag, sr3.PreliminaryFlag) == ("VERIFIED", "FINAL")
        pred = sr3.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert pred.ReferencedSOPInstanceUID == v2.sop_instance_uid
        assert sr2.StudyInstanceUID == sr3.StudyInstanceUID == session.get(Study, study_id).study_instance_uid

        draft_text, approved_text = report_text(v1), report_text(v3)
        assert draft_text.startswith(UNVERIFIED_HEADING) and "unverified AI output" in draft_text
        assert "Cardiomegaly: present (probability 0.90)" in draft_text
        assert approved_text.startswith(VERIFIED_HEADING) and "NOT VERIFIED" not in approved_text
        assert "replaces version 2" in approved_text and "Verified by anna" in approved_text

        body = report_json(v3)
        assert body["flags"] == {"completion": "COMPLETE", "verification": "VERIFIED", "preliminary": "FINAL"}
        assert body["predecessor"] == {"id": v2.id, "version": 2, "sop_instance_uid": v2.sop_instance_uid}
        assert body["model"]["name"] == PROVENANCE.name and body["verifier"] == "anna"
        assert body["verified_at"].endswith("+00:00") and body["created_at"].endswith("+00:00")
        assert len(body["exports"]) == 2 and body["impression_text"] == "Cardiomegaly."
        draft_json = report_json(v1)
        assert draft_json["status"] == UNVERIFIED_HEADING and draft_json["predecessor"] is None
        assert draft_json["flags"]["preliminary"] == "PRELIMINARY"


def test_bad_version_requests_are_refused(sqlite_registry: Registry, settings: Settings) -> None:
    study_id, _ = add_study_without_history(sqlite_registry, settings)
    with sqlite_registry.session() as session:
        with pytest.raises(ReportingError, match="no report to revise"):
            create_version(
                session, settings, study_id, kind="edit", findings_text="x", impression_text=None, author="anna"
            )
        with pytest.raises(ValueError, match="kind must be one of"):
            create_version(
                session, settings, study_id, kind="ai_draft", findings_text="x", impression_text=None, author="anna"
            )
        with pytest.raises(LookupError):
            create_ai_draft(session, settings, 999_999, model_output(1), PROVENANCE)


def test_a_new_model_version_makes_a_new_draft_after_the_old_one(sqlite_registry: Registry, settings: Settings) -> None:
    from dataclasses import replace

    study_id, _ = add_study_without_history(sqlite_registry, settings)
    with sqlite_registry.session() as session:
        old = create_ai_draft(session, settings, study_id, model_output(study_id), PROVENANCE)
        new = create_ai_draft(session, settings, study_id, model_output(study_id), replace(PROVENANCE, version="2.1"))
        assert (new.version, new.predecessor_id) == (2, old.id) and new.sop_instance_uid != old.sop_instance_uid


def test_racing_workers_make_one_draft_and_one_file(registry: Registry, two_destinations: Settings) -> None:
    """Two workers finish the same study at once (a redelivered task): one Report, one SR file, one outbox."""
    import threading

    from sqlalchemy.exc import OperationalError

    settings = two_destinations
    study_id, _ = add_study_without_history(registry, settings)
    barrier = threading.Barrier(2)
    results: list[int] = []
    locked: list[Exception] = []

    def worker(text: str) -> None:
        barrier.wait()
        try:
            with registry.session() as session:
                results.append(
                    create_ai_draft(session, settings, study_id, model_output(study_id, text), PROVENANCE).id
                )
        except OperationalError as exc:  # SQLite: the second writer of one snapshot is told to retry
            locked.append(exc)

    threads = [threading.Thread(target=worker, args=(f"text {i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if registry.engine.dialect.name == "postgresql":
        assert locked == [] and len(results) == 2
    assert len(set(results)) == 1 and len(results) + len(locked) == 2
    with registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Report)) == 1
        assert session.scalar(select(func.count()).select_from(Export)) == 2
        report = session.get(Report, results[0])
        on_disk = dcmread(settings.sr_dir / report.sr_path)
    assert len(list(settings.sr_dir.rglob("*.dcm"))) == 1
    texts = [item.TextValue for item in on_disk.ContentSequence[-1].ContentSequence if item.ValueType == "TEXT"]
    assert report.findings_text in texts  # the file says what the row says
