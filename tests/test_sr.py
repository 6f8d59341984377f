"""The SR documents: valid for dicom3tools, readable by dcmtk, honest flags, study and evidence from the source."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from radialog.chexpert import CHEXPERT_LABELS
from radialog.registry import Registry
from radialog.settings import Settings
from reporting import codes
from reporting.sr import AI_SERIES_DESCRIPTION, APPROVED_SERIES_DESCRIPTION, ai_draft_uids, derived_uid
from reporting.versions import create_ai_draft, create_version
from tests.support.dicom_files import dciodvfy_errors
from tests.support.seeding import FINDINGS_TEXT, PROVENANCE, add_study_without_history, model_output


def _draft(registry: Registry, settings: Settings):
    study_id, source = add_study_without_history(registry, settings)
    with registry.session() as session:
        report = create_ai_draft(session, settings, study_id, model_output(study_id), PROVENANCE)
    return study_id, source, report


def _content_items(item, found=None):
    found = [] if found is None else found
    for child in getattr(item, "ContentSequence", []):
        found.append(child)
        _content_items(child, found)
    return found


def test_ai_draft_sr_is_valid_readable_and_flagged_unverified(sqlite_registry: Registry, settings: Settings) -> None:
    _, source, report = _draft(sqlite_registry, settings)
    path = settings.sr_dir / report.sr_path

    assert dciodvfy_errors(path) == []
    dump = subprocess.run(["dsrdump", "+Pl", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert FINDINGS_TEXT in dump.stdout and "Diagnostic imaging report" in dump.stdout

    sr = dcmread(path)
    assert sr.Modality == "SR" and sr.SOPInstanceUID == report.sop_instance_uid
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert sr.SeriesDescription == AI_SERIES_DESCRIPTION and "not verified" in sr.SeriesDescription
    # same study and patient as the image, a series of its own
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.AccessionNumber == source.AccessionNumber and sr.SeriesInstanceUID != source.SeriesInstanceUID
    # the source image is the evidence
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert (
        evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    )
    # the algorithm in Contributing Equipment (IHE AI Results) and the private scheme declared
    equipment = [e for e in sr.ContributingEquipmentSequence if e.get("ManufacturerModelName") == PROVENANCE.name]
    assert equipment and equipment[0].SoftwareVersions == PROVENANCE.version
    assert PROVENANCE.files_sha256 in equipment[0].ContributionDescription
    assert [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence] == [codes.PRIVATE_SCHEME]

    items = _content_items(sr)
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert FINDINGS_TEXT in texts
    assert any("NOT VERIFIED" in t and "unverified AI output" in t for t in texts)
    assert any(t == PROVENANCE.name for t in texts)  # TID 4019 algorithm name (and device observer name)
    assert any(t.endswith(PROVENANCE.files_sha256) for t in texts)  # algorithm parameters: the files' hash
    coded = [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"]
    assert len(coded) == len(CHEXPERT_LABELS)
    cardiomegaly = next(i for i in coded if i.ConceptCodeSequence[0].CodeValue == "287272002")
    presence = cardiomegaly.ContentSequence[0].ConceptCodeSequence[0]
    probability = cardiomegaly.ContentSequence[1].MeasuredValueSequence[0].NumericValue
    assert presence.CodeMeaning == "Present" and float(probability) == pytest.approx(0.9)
    observer_types = [
        i.ConceptCodeSequence[0].CodeMeaning
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121005"
    ]
    assert observer_types == ["Device"]


def test_approved_version_is_final_verified_and_references_its_predecessor(
    sqlite_registry: Registry, settings: Settings
) -> None:
    study_id, source, draft = _draft(sqlite_registry, settings)
    with sqlite_registry.session() as session:
        approved = create_version(
            session,
            settings,
            study_id,
            kind="approval",
            findings_text="Cardiomegaly. Small left effusion.",
            impression_text="Cardiomegaly with small left pleural effusion.",
            author="Smith^Anna",
            approve=True,
        )
    path = settings.sr_dir / approved.sr_path
    assert dciodvfy_errors(path) == []
    assert subprocess.run(["dsrdump", str(path)], check=False, capture_output=True, timeout=60).returncode == 0
    sr = dcmread(path)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    assert sr.SeriesDescription == APPROVED_SERIES_DESCRIPTION
    observer = sr.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "Smith^Anna"
    assert observer.VerifyingOrganization == settings.institution_name
    predecessor = sr.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == source.StudyInstanceUID
    ref = predecessor.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == draft.series_instance_uid
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == draft.sop_instance_uid
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SOPInstanceUID != draft.sop_instance_uid
    texts = [i.TextValue for i in _content_items(sr) if i.ValueType == "TEXT"]
    assert "Cardiomegaly with small left pleural effusion." in texts
    assert not any("NOT VERIFIED" in t for t in texts) and any(t.startswith("Verified by Smith^Anna") for t in texts)


def test_ai_draft_uid_is_derived_from_study_model_and_version() -> None:
    first = ai_draft_uids("1.2.3", "RaDialog-LLaVA", "2.0")
    assert first == ai_draft_uids("1.2.3", "RaDialog-LLaVA", "2.0")
    assert first[0] != ai_draft_uids("1.2.3", "RaDialog-LLaVA", "2.1")[0]
    assert first[0] != ai_draft_uids("1.2.4", "RaDialog-LLaVA", "2.0")[0]
    assert first[0] != first[1]
    uid = derived_uid("x")
    assert uid.startswith("2.25.") and len(uid) <= 64


def test_unknown_label_gets_a_private_code_not_dropped() -> None:
    assert codes.finding_code("Cardiomegaly").scheme_designator == "SCT"
    assert codes.finding_code("Hernia").scheme_designator == codes.PRIVATE_SCHEME
    assert not codes.uses_private_codes(["Cardiomegaly", "Edema"])


def test_missing_source_image_is_a_clear_error(sqlite_registry: Registry, settings: Settings) -> None:
    from reporting.versions import ReportingError

    study_id, source = add_study_without_history(sqlite_registry, settings)
    Path(settings.spool_dir / source.StudyInstanceUID / f"{source.SOPInstanceUID}.dcm").unlink()
    with pytest.raises(ReportingError, match="missing from the spool"), sqlite_registry.session() as session:
        create_ai_draft(session, settings, study_id, model_output(study_id), PROVENANCE)


def test_a_test_model_says_so_in_the_document(sqlite_registry: Registry, settings: Settings) -> None:
    from dataclasses import replace

    study_id, _ = add_study_without_history(sqlite_registry, settings)
    with sqlite_registry.session() as session:
        report = create_ai_draft(session, settings, study_id, model_output(study_id), replace(PROVENANCE, tiny=True))
    path = settings.sr_dir / report.sr_path
    texts = [i.TextValue for i in _content_items(dcmread(path)) if i.ValueType == "TEXT"]
    assert any("random-weight TEST model" in t for t in texts)
    assert "random-weight test checkpoint, not a clinical model" in texts
    assert dciodvfy_errors(path) == []


def test_a_source_without_optional_patient_attributes_still_gives_a_valid_sr(tmp_path: Path) -> None:
    from radialog.synthetic import make_cxr
    from reporting.sr import SRSpec, build_sr, new_uid

    source = make_cxr(rows=32, cols=32)
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        delattr(source, keyword)
    sr = build_sr(source, SRSpec(new_uid(), new_uid(), 901, 1, "No acute findings."))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert sr.PatientID == source.PatientID and sr.AccessionNumber == ""


def test_draft_of_a_model_without_classifier_names_the_model_and_carries_no_coded_findings(
    sqlite_registry: Registry, settings: Settings
) -> None:
    """XrayGPT (issue 16): the text and the algorithm identification, no CheXpert codes; the series
    description, the algorithm and the hash are XrayGPT's."""
    from radialog.model_output import Provenance, ReportOutput

    xraygpt = Provenance(name="XrayGPT", version="1.0", files_sha256="7a" * 32, display_name="XrayGPT")
    study_id, _source = add_study_without_history(sqlite_registry, settings)
    output = ReportOutput(
        key=str(study_id), findings_text=FINDINGS_TEXT, findings=[], findings_phrase="", generated_tokens=30, timings={}
    )
    with sqlite_registry.session() as session:
        report = create_ai_draft(session, settings, study_id, output, xraygpt)
        path = settings.sr_dir / report.sr_path
        assert report.findings == [] and report.model_name == "XrayGPT"
        assert report.sop_instance_uid == ai_draft_uids(_source.StudyInstanceUID, "XrayGPT", "1.0")[0]

    assert dciodvfy_errors(path) == []
    dump = subprocess.run(["dsrdump", "+Pl", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    sr = dcmread(path)
    assert sr.SeriesDescription == "AI draft report (XrayGPT) - not verified"
    assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "PRELIMINARY")
    equipment = [e for e in sr.ContributingEquipmentSequence if e.get("ManufacturerModelName") == "XrayGPT"]
    assert equipment and xraygpt.files_sha256 in equipment[0].ContributionDescription
    assert "CodingSchemeIdentificationSequence" not in sr  # no private CheXpert codes used
    items = _content_items(sr)
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert FINDINGS_TEXT in texts
    assert any("generated by XrayGPT 1.0" in t and "unverified AI output" in t for t in texts)
    assert "XrayGPT" in texts and any(t.endswith(xraygpt.files_sha256) for t in texts)  # TID 4019 name and hash
    assert not [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"]
    assert "RaDialog" not in dump.stdout

    with sqlite_registry.session() as session:  # a radiologist's edit of it: their text, no AI container
        edited = create_version(
            session, settings, study_id, kind="edit", findings_text="Normal chest.", impression_text=None, author="dr-x"
        )
        edited_path = settings.sr_dir / edited.sr_path
    assert dciodvfy_errors(edited_path) == []
    assert dcmread(edited_path).SeriesDescription == "Edited AI-assisted report - not verified"


@pytest.mark.parametrize("bad", ["\x00", "\x0f", "\t", "\x0b", "\x1b", "\x7f", "\x85", "\ud800"])
def test_the_builder_refuses_text_no_dicom_text_value_may_hold(bad: str, tmp_path: Path) -> None:
    """The SR builder never writes what dciodvfy calls "Character invalid for this VR": it refuses with a
    typed error naming the field and the character, for every text it writes (findings, impression, people)."""
    from dataclasses import replace

    from radialog.synthetic import make_cxr
    from reporting.sr import Algorithm, SRSpec, Verification, build_sr, new_uid
    from reporting.text import InvalidReportText

    source = make_cxr(rows=32, cols=32)
    spec = SRSpec(
        new_uid(),
        new_uid(),
        901,
        1,
        "Heart normal.",
        impression_text="Normal.",
        author="anna",
        algorithm=Algorithm("RaDialog", "2.0", "0" * 64),
    )
    build_sr(source, spec)  # the clean spec builds
    for field, changed in (
        ("findings text", replace(spec, findings_text=f"Small{bad} effusion.")),
        ("impression text", replace(spec, impression_text=f"Normal{bad}.")),
        ("author", replace(spec, author=f"an{bad}na")),
        ("algorithm version", replace(spec, algorithm=Algorithm("RaDialog", f"2{bad}0", "0" * 64))),
    ):
        with pytest.raises(InvalidReportText, match=f"^{field}: ") as refused:
            build_sr(source, changed)
        assert refused.value.character == bad
    # short VRs (LO / PN of the observer) refuse the value delimiter too, and their length limit
    with pytest.raises(InvalidReportText, match="verifying observer"):
        build_sr(source, replace(spec, verification=Verification("Smith\\Anna", "Hospital")))
    with pytest.raises(InvalidReportText, match="longer than the 64"):
        build_sr(source, replace(spec, author="x" * 65))


def test_a_version_with_invalid_text_is_refused_before_anything_is_stored(
    sqlite_registry: Registry, settings: Settings
) -> None:
    from sqlalchemy import func, select

    from radialog.registry import Report
    from reporting.text import InvalidReportText

    study_id, _ = add_study_without_history(sqlite_registry, settings)
    with pytest.raises(InvalidReportText), sqlite_registry.session() as session:
        create_ai_draft(session, settings, study_id, model_output(study_id, "om0vi\x0fgaly"), PROVENANCE)
    with sqlite_registry.session() as session:
        create_ai_draft(session, settings, study_id, model_output(study_id), PROVENANCE)
    with pytest.raises(InvalidReportText), sqlite_registry.session() as session:
        create_version(
            session, settings, study_id, kind="edit", findings_text="Edited\x00.", impression_text=None, author="anna"
        )
    with sqlite_registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Report)) == 1
    assert len(list(settings.sr_dir.rglob("*.dcm"))) == 1
