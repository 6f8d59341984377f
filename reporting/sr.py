"""Build a report version as a DICOM Comprehensive SR with highdicom (TID 2000-style document).

The SR lives in the source image's study (patient and study attributes copied from its header), in a
new series of its own. Content tree::

    CONTAINER 18748-4 "Diagnostic imaging report" (TID 2000)
      HAS OBS CONTEXT  person observer (radiologist versions) and device observer (the algorithm)
      CONTAINS CONTAINER "Findings"
        TEXT Comment   status line: unverified AI output until approved / who verified it
        TEXT Finding   the findings text
        CONTAINER "CAD Processing and Findings Summary"  (the AI's own versions)
          HAS CONCEPT MOD  TID 4019 algorithm name, version, parameters (model files' SHA-256), family
          CODE Finding = <CheXpert label code>   (only a model with a findings classifier: RaDialog)
            HAS CONCEPT MOD  Presence of property = Present | Absent
            HAS PROPERTIES   NUM Probability (no units, 0..1)
      CONTAINS CONTAINER "Impressions"   (when there is an impression)
        TEXT Impression

Flags: an unverified version is COMPLETE / UNVERIFIED / PRELIMINARY; an approved one is COMPLETE /
VERIFIED / FINAL with the radiologist as verifying observer. The algorithm is also named in the
Contributing Equipment Sequence (IHE AI Results). The source image is the evidence (Current Requested
Procedure Evidence Sequence); earlier versions are listed in the Predecessor Documents Sequence.

Text: Specific Character Set ISO_IR 192 (UTF-8); every text must already follow ``reporting.text``'s
rule, or ``build_sr`` refuses it (``InvalidReportText``) rather than write an invalid SR.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    ComprehensiveSR,
    ContainerContentItem,
    NumContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ComprehensiveSRStorage
from pydicom.valuerep import DT

from reporting import codes
from reporting.text import require_valid

#: Root of our UUID5 namespace for derived UIDs (the UIDs themselves are 2.25.<uuid int>).
_UID_NAMESPACE = uuid.UUID("6f1d3b8e-5a0c-4c5e-9a47-2d1b7e0c9f10")

AI_SERIES_DESCRIPTION_TEMPLATE = "AI draft report ({model}) - not verified"
AI_SERIES_DESCRIPTION = AI_SERIES_DESCRIPTION_TEMPLATE.format(model="RaDialog")  # RaDialog's drafts
EDITED_SERIES_DESCRIPTION = "Edited AI-assisted report - not verified"
APPROVED_SERIES_DESCRIPTION = "Radiologist-approved report (AI-assisted)"
MANUFACTURER = "radialog-node"


def derived_uid(*parts: str) -> str:
    """A deterministic 2.25 UID (UUID5 of the parts): the same inputs always give the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def ai_draft_uids(study_uid: str, model_name: str, model_version: str) -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) of the AI draft for one study and model version.

    Derived, so a repeated job for the same study and model version yields the same SR, never a second.
    """
    return (
        derived_uid("sr-instance", study_uid, model_name, model_version),
        derived_uid("sr-series", study_uid, model_name, model_version),
    )


def new_uid() -> str:
    """A fresh UID for a radiologist version."""
    return f"2.25.{uuid.uuid4().int}"


def person_name(user: str) -> str:
    """A user name as DICOM PN: 'Family^Given' is kept, a bare login becomes the family name."""
    return user if "^" in user else f"{user}^"


@dataclass(frozen=True)
class Algorithm:
    """The model that produced the draft: TID 4019, device observer and Contributing Equipment."""

    name: str
    version: str
    files_sha256: str
    manufacturer: str = MANUFACTURER
    test_model: bool = False  # a tiny random-weight checkpoint: said in the document, never clinical
    display_name: str = ""  # the name readers know the model by ("RaDialog", "XrayGPT"); default: ``name``

    @property
    def device_uid(self) -> str:
        return derived_uid("device", self.name, self.version, self.files_sha256)


@dataclass(frozen=True)
class CodedFinding:
    """One classifier label with its probability and the thresholded decision."""

    label: str
    probability: float
    present: bool


@dataclass(frozen=True)
class Verification:
    """Who approved a version, for whom, and when."""

    observer: str
    organization: str
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Predecessor:
    """Enough of an earlier SR version to reference it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ComprehensiveSRStorage


@dataclass(frozen=True)
class SRSpec:
    """Everything one SR version says; the builder turns it into DICOM."""

    sop_instance_uid: str
    series_instance_uid: str
    series_number: int
    instance_number: int
    findings_text: str
    impression_text: str | None = None
    findings: Sequence[CodedFinding] = ()
    algorithm: Algorithm | None = None
    author: str | None = None  # a person: radiologist versions
    verification: Verification | None = None
    predecessors: Sequence[Predecessor] = ()
    institution_name: str | None = None
    notes: Sequence[str] = ()  # said after the status line (routing: "patient age unknown: ...")

    @property
    def verified(self) -> bool:
        return self.verification is not None


#: Type 2 patient/study attributes highdicom copies from the source; some modalities leave them out.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _complete_header(source: Dataset) -> Dataset:
    """A copy of the source header with absent Type 2 attributes present and empty, as DICOM wants."""
    header = Dataset()
    header.update(source)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def read_source_header(path: Path) -> Dataset:
    """The source image's header (no pixel data): patient, study and reference attributes."""
    return dcmread(path, stop_before_pixels=True)


def status_line(spec: SRSpec) -> str:
    """The sentence that tells a reader whether the text is verified, then the routing notes if any."""
    line = _verification_sentence(spec)
    notes = [n.strip().rstrip(".") for n in spec.notes if n.strip()]
    return " ".join([line, *(f"Note: {n[:1].upper()}{n[1:]}." for n in notes)])


def read_status_line(path: Path) -> str:
    """The status line of a written SR (its first Comment in Findings), as the document says it."""
    ds = dcmread(path)
    for section in ds.ContentSequence:
        for item in section.get("ContentSequence") or []:
            name = item.ConceptNameCodeSequence[0]
            if item.ValueType == "TEXT" and name.CodeValue == codes.COMMENT.value:
                return str(item.TextValue)
    raise ValueError("the SR has no status line")


def _verification_sentence(spec: SRSpec) -> str:
    if spec.verification is not None:
        when = spec.verification.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"Verified by {spec.verification.observer} ({spec.verification.organization}) on {when}."
    origin = f"{spec.algorithm.name} {spec.algorithm.version}" if spec.algorithm else "an AI model"
    if spec.algorithm and spec.algorithm.test_model:
        origin += " (a random-weight TEST model, not a clinical model)"
    if spec.author:
        return (
            f"AI DRAFT - NOT VERIFIED: edited by {spec.author}, generated with {origin}; unverified AI "
            "output until a radiologist approves it."
        )
    return f"AI DRAFT - NOT VERIFIED: generated by {origin}; unverified AI output until a radiologist approves it."


def series_description(spec: SRSpec) -> str:
    """Says what the version is; an AI draft also names the model that wrote it."""
    if spec.verified:
        return APPROVED_SERIES_DESCRIPTION
    if spec.author:
        return EDITED_SERIES_DESCRIPTION
    model = (spec.algorithm.display_name or spec.algorithm.name) if spec.algorithm else "AI"
    return AI_SERIES_DESCRIPTION_TEMPLATE.format(model=model)[:64]


def _observer_context(spec: SRSpec) -> list[hd.sr.ContentItem]:
    items: list[hd.sr.ContentItem] = []
    if spec.author:
        items.extend(
            hd.sr.ObserverContext(  # type: ignore[arg-type]  # highdicom: a Template yields ContentItems, typed Sequence[Dataset]
                observer_type=dcm_codes.cid270.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                    name=person_name(spec.author),
                    login_name=spec.author,
                    organization_name=spec.institution_name,
                ),
            )
        )
    if spec.algorithm:
        items.extend(
            hd.sr.ObserverContext(  # type: ignore[arg-type]  # highdicom: a Template yields ContentItems, typed Sequence[Dataset]
                observer_type=dcm_codes.cid270.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=spec.algorithm.device_uid,
                    name=spec.algorithm.name,
                    manufacturer_name=spec.algorithm.manufacturer,
                    model_name=f"{spec.algorithm.name} {spec.algorithm.version}",
                ),
            )
        )
    return items


def _classifier_container(findings: Sequence[CodedFinding], algorithm: Algorithm | None) -> ContainerContentItem:
    container = ContainerContentItem(name=codes.CLASSIFIER_FINDINGS, relationship_type=RelationshipTypeValues.CONTAINS)
    children: list[hd.sr.ContentItem] = []
    if algorithm:
        children.extend(
            hd.sr.AlgorithmIdentification(  # type: ignore[arg-type]  # highdicom: a Template yields ContentItems, typed Sequence[Dataset]
                name=algorithm.name,
                version=algorithm.version,
                parameters=[f"model files SHA-256 {algorithm.files_sha256}"]
                + (["random-weight test checkpoint, not a clinical model"] if algorithm.test_model else []),
                family=codes.ARTIFICIAL_INTELLIGENCE,
                manufacturer=algorithm.manufacturer,
            )
        )
    for finding in findings:
        item = CodeContentItem(
            name=codes.FINDING,
            value=codes.finding_code(finding.label),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        item.ContentSequence = hd.sr.ContentSequence(
            [
                CodeContentItem(
                    name=codes.PRESENCE,
                    value=codes.PRESENT if finding.present else codes.ABSENT,
                    relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
                ),
                NumContentItem(
                    name=codes.PROBABILITY,
                    value=round(float(finding.probability), 4),
                    unit=codes.NO_UNITS,
                    relationship_type=RelationshipTypeValues.HAS_PROPERTIES,
                ),
            ]
        )
        children.append(item)
    container.ContentSequence = hd.sr.ContentSequence(children)
    return container


def _text(name: hd.sr.CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def content_tree(spec: SRSpec) -> ContainerContentItem:
    """The TID 2000-style root container for ``spec``."""
    root = ContainerContentItem(name=codes.DOCUMENT_TITLE, template_id="2000")
    findings = ContainerContentItem(name=codes.FINDINGS_SECTION, relationship_type=RelationshipTypeValues.CONTAINS)
    findings_items: list[hd.sr.ContentItem] = [
        _text(codes.COMMENT, status_line(spec)),
        _text(codes.FINDING, spec.findings_text.strip() or "(no findings text)"),
    ]
    if spec.findings:
        findings_items.append(_classifier_container(spec.findings, spec.algorithm))
    elif spec.algorithm and not spec.author and not spec.verified:
        # the AI's own draft from a model without a findings classifier (XrayGPT): no coded findings, but
        # the algorithm that wrote the text is still identified (TID 4019)
        findings_items.append(_classifier_container((), spec.algorithm))
    findings.ContentSequence = hd.sr.ContentSequence(findings_items)
    sections: list[hd.sr.ContentItem] = [*_observer_context(spec), findings]
    if spec.impression_text and spec.impression_text.strip():
        impression = ContainerContentItem(
            name=codes.IMPRESSION_SECTION, relationship_type=RelationshipTypeValues.CONTAINS
        )
        impression.ContentSequence = hd.sr.ContentSequence([_text(codes.IMPRESSION, spec.impression_text.strip())])
        sections.append(impression)
    root.ContentSequence = hd.sr.ContentSequence(sections)
    return root


def _coding_schemes(spec: SRSpec) -> list[hd.coding_schemes.CodingSchemeIdentificationItem] | None:
    if not codes.uses_private_codes([f.label for f in spec.findings]):
        return None
    return [
        hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=codes.PRIVATE_SCHEME,
            name=codes.PRIVATE_SCHEME_NAME,
            responsible_organization=MANUFACTURER,
        )
    ]


def _predecessor_dataset(p: Predecessor) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = p.study_instance_uid
    ds.SeriesInstanceUID = p.series_instance_uid
    ds.SOPInstanceUID = p.sop_instance_uid
    ds.SOPClassUID = p.sop_class_uid
    return ds


def _contributing_equipment(algorithm: Algorithm) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        device_serial_number=algorithm.files_sha256[:64],
        contribution_description=(f"AI report generation; model files SHA-256 {algorithm.files_sha256}")[:1024],
    )


def validate_spec(spec: SRSpec) -> None:
    """Refuse (``InvalidReportText``) any text of ``spec`` that is not valid for the VR it goes into.

    The builder never alters text: what was stored and shown must be what is written, so text that
    breaks the rule (``reporting.text``) is an error of whoever made it, told apart by its type.
    """
    require_valid(spec.findings_text, "findings text")
    if spec.impression_text is not None:
        require_valid(spec.impression_text, "impression text")
    people = [("author", spec.author)]
    if spec.verification is not None:
        people.append(("verifying observer", spec.verification.observer))
        require_valid(spec.verification.organization, "verifying organization", "LO")
    for field_name, name in people:
        if name is not None:  # login name (LO), person name (PN) and the status line (UT)
            require_valid(name, field_name, "LO")
    for note in spec.notes:
        require_valid(note, "routing note")
    if spec.institution_name is not None:
        require_valid(spec.institution_name, "institution name", "LO")
    if spec.algorithm is not None:  # TEXT items (UT) and, cut to 64, Contributing Equipment (LO)
        for field_name, value in (
            ("algorithm name", spec.algorithm.name),
            ("algorithm version", spec.algorithm.version),
        ):
            require_valid(value, field_name)
            require_valid(value[:64], field_name, "LO")


def build_sr(source: Dataset, spec: SRSpec) -> ComprehensiveSR:
    """The SR document for ``spec``, in ``source``'s study, referencing ``source`` as evidence.

    Raises ``InvalidReportText`` for text no DICOM text VR may hold (``validate_spec``).
    """
    validate_spec(spec)
    for p in spec.predecessors:
        if p.study_instance_uid != source.StudyInstanceUID:
            raise ValueError("a predecessor version belongs to another study")
    verification = spec.verification
    sr = ComprehensiveSR(
        evidence=[_complete_header(source)],
        content=content_tree(spec),
        series_instance_uid=spec.series_instance_uid,
        series_number=spec.series_number,
        sop_instance_uid=spec.sop_instance_uid,
        instance_number=spec.instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=spec.verified,
        is_verified=spec.verified,
        institution_name=spec.institution_name,
        verifying_observer_name=person_name(verification.observer) if verification else None,
        verifying_organization=verification.organization if verification else None,
        previous_versions=[_predecessor_dataset(p) for p in spec.predecessors] or None,
        contributing_equipment=[_contributing_equipment(spec.algorithm)] if spec.algorithm else None,
        series_description=series_description(spec),
        coding_schemes=_coding_schemes(spec),
        specific_character_set="ISO_IR 192",
    )
    if verification is not None:  # the approval time, not the time this file was built
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(verification.at)
    return sr
