"""Code tables for the SR: document and section titles, presence and probability, the CheXpert labels.

Standard codes come from DICOM PS3.16 (checked against pydicom's code dictionary, which is generated
from it) or from SNOMED CT. Four CheXpert labels have no exact standard concept and get codes in our
private scheme ``99RADIALOG`` (declared in the SR's Coding Scheme Identification Sequence):
Enlarged Cardiomediastinum, Lung Lesion, Pleural Other and Support Devices (standard terminologies
have only narrower or broader concepts). An unknown label also gets a private code. "No Finding" maps to DCM 111286
"No abnormality" and "Lung Opacity" to DCM 112001 "Opacity" (the chest CAD finding of CID 6102).
"""

from __future__ import annotations

from highdicom.sr import CodedConcept

PRIVATE_SCHEME = "99RADIALOG"
PRIVATE_SCHEME_NAME = "radialog-node private codes for CheXpert labels without a standard concept"

#: TID 2000 document title (CID 7000): LOINC "Diagnostic imaging report".
DOCUMENT_TITLE = CodedConcept("18748-4", "LN", "Diagnostic imaging report")
#: Section headings (CID 7001).
FINDINGS_SECTION = CodedConcept("59776-5", "LN", "Findings")
IMPRESSION_SECTION = CodedConcept("19005-8", "LN", "Impressions")
#: Section items (CID 7002).
FINDING = CodedConcept("121071", "DCM", "Finding")
IMPRESSION = CodedConcept("121073", "DCM", "Impression")
COMMENT = CodedConcept("121106", "DCM", "Comment")
#: A sub-container holding the classifier's coded output.
CLASSIFIER_FINDINGS = CodedConcept("111017", "DCM", "CAD Processing and Findings Summary")
#: Presence (CID 240) and probability of each coded finding.
PRESENCE = CodedConcept("121052", "DCM", "Presence of property")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
#: Algorithm family for TID 4019 (CID 7162).
ARTIFICIAL_INTELLIGENCE = CodedConcept("123110", "DCM", "Artificial Intelligence")


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


#: CheXpert label (as the classifier names it) -> coded concept.
CHEXPERT_CODES: dict[str, CodedConcept] = {
    "No Finding": CodedConcept("111286", "DCM", "No abnormality"),
    "Enlarged Cardiomediastinum": _private("CHX-ECM", "Enlarged cardiomediastinum"),
    "Cardiomegaly": CodedConcept("287272002", "SCT", "Cardiomegaly"),
    "Lung Opacity": CodedConcept("112001", "DCM", "Opacity"),
    "Lung Lesion": _private("CHX-LL", "Lung lesion"),
    "Edema": CodedConcept("19242006", "SCT", "Pulmonary edema"),
    "Consolidation": CodedConcept("95436008", "SCT", "Lung consolidation"),
    "Pneumonia": CodedConcept("233604007", "SCT", "Pneumonia"),
    "Atelectasis": CodedConcept("46621007", "SCT", "Atelectasis"),
    "Pneumothorax": CodedConcept("36118008", "SCT", "Pneumothorax"),
    "Pleural Effusion": CodedConcept("60046008", "SCT", "Pleural effusion"),
    "Pleural Other": _private("CHX-PO", "Other pleural abnormality"),
    "Fracture": CodedConcept("125605004", "SCT", "Fracture of bone"),
    "Support Devices": _private("CHX-SD", "Support devices"),
}


def finding_code(label: str) -> CodedConcept:
    """The concept for a CheXpert label; an unknown label gets a private code rather than being dropped."""
    code = CHEXPERT_CODES.get(label)
    if code is not None:
        return code
    value = "CHX-" + "".join(ch for ch in label.upper() if ch.isalnum())[:12]
    return _private(value, label[:64])


def uses_private_codes(labels: list[str]) -> bool:
    """True when a document with these labels needs the private scheme declared."""
    return any(finding_code(label).scheme_designator == PRIVATE_SCHEME for label in labels)
