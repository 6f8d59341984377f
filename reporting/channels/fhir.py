"""FHIR R4 DiagnosticReport of one report version: built as plain JSON, validated with ``fhir.resources``
(its R4B models: DiagnosticReport, Observation and Device are the same as R4's), served by the API and
pushed to a FHIR server (``PUT [base]/DiagnosticReport/[id]``: the id is derived from the study, so each
new version updates the one report, and a repeated PUT changes nothing).

The DiagnosticReport: status preliminary / final / amended (``base.result_status``), code LOINC 18748-4,
category RAD, the study by its Study Instance UID (``imagingStudy`` by identifier ``urn:oid:``), the
accession number and the SR's SOP Instance UID as identifiers, ``conclusion`` (the impression, else the
findings), the whole text with its status line as ``presentedForm``, the verifying radiologist as
``resultsInterpreter`` once approved. Contained: the algorithm as a Device and, for the AI's own versions,
one Observation per classifier finding with the SR's code, present/absent and its probability.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import httpx

from reporting import codes
from reporting.channels.base import FHIR_STATUS, Delivery, DeliveryError, StudyView, VersionView
from reporting.sr import derived_uid

SYSTEMS = {
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    codes.PRIVATE_SCHEME: "urn:radialog-node:codes:99RADIALOG",
}
DICOM_UID = "urn:dicom:uid"
_ID_NAMESPACE = uuid.UUID("1b0c3f0e-9a0d-4f43-8f5e-6f5b1c0a7d21")


def _coding(concept: Any) -> dict[str, str]:
    return {
        "system": SYSTEMS.get(concept.scheme_designator, f"urn:radialog-node:codes:{concept.scheme_designator}"),
        "code": str(concept.value),
        "display": str(concept.meaning),
    }


def report_id(study_instance_uid: str) -> str:
    """The DiagnosticReport's logical id: one per study, updated by every version (FHIR id: [A-Za-z0-9-.])."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"diagnostic-report|{study_instance_uid}"))


def _device(version: VersionView) -> dict[str, Any]:
    name = version.model_name or "AI model"
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": "algorithm",
        "identifier": [
            {
                "system": DICOM_UID,
                "value": "urn:oid:"
                + derived_uid("device", name, version.model_version or "", version.model_hash or ""),
            }
        ],
        "manufacturer": "radialog-node",
        "deviceName": [{"name": name, "type": "model-name"}],
        "version": [{"value": version.model_version or "unknown"}],
        "type": {"coding": [_coding(codes.ARTIFICIAL_INTELLIGENCE)]},
    }
    if version.model_hash:
        device["note"] = [{"text": f"model files SHA-256 {version.model_hash}"}]
    return device


def _observations(version: VersionView, status: str) -> list[dict[str, Any]]:
    if not version.coded:
        return []
    out = []
    for number, finding in enumerate(version.findings, 1):
        present = bool(finding.get("present"))
        out.append(
            {
                "resourceType": "Observation",
                "id": f"finding-{number}",
                "status": status,
                "category": [
                    {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}
                        ]
                    }
                ],
                "code": {"coding": [_coding(codes.finding_code(str(finding["label"])))], "text": str(finding["label"])},
                "valueCodeableConcept": {"coding": [_coding(codes.PRESENT if present else codes.ABSENT)]},
                "component": [
                    {
                        "code": {"coding": [_coding(codes.PROBABILITY)]},
                        "valueQuantity": {
                            "value": round(float(finding.get("probability", 0.0)), 4),
                            "system": SYSTEMS["UCUM"],
                            "code": "1",
                            "unit": "no units",
                        },
                    }
                ],
                "device": {"reference": "#algorithm"},
            }
        )
    return out


def full_text(version: VersionView) -> str:
    """The report as a reader sees it: status line, findings, impression."""
    parts = [version.status_line, "", "Findings:", version.findings_text]
    if version.impression_text:
        parts += ["", "Impression:", version.impression_text]
    return "\n".join(parts)


def diagnostic_report(study: StudyView, version: VersionView) -> dict[str, Any]:
    """The DiagnosticReport (JSON) of one version, validated by ``fhir.resources``; ValueError if invalid."""
    status = FHIR_STATUS[version.status]
    observations = _observations(version, status)
    identifiers: list[dict[str, Any]] = [{"system": DICOM_UID, "value": f"urn:oid:{version.sop_instance_uid}"}]
    if study.accession_number:
        identifiers.append(
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                "value": study.accession_number,
            }
        )
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id(study.study_instance_uid),
        "identifier": identifiers,
        "status": status,
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
                ]
            }
        ],
        "code": {"coding": [_coding(codes.DOCUMENT_TITLE)]},
        "issued": version.created_at.isoformat(),
        "imagingStudy": [
            {
                "type": "ImagingStudy",
                "identifier": {"system": DICOM_UID, "value": f"urn:oid:{study.study_instance_uid}"},
            }
        ],
        "conclusion": (version.impression_text or version.findings_text)[:10000],
        "presentedForm": [
            {
                "contentType": "text/plain; charset=utf-8",
                "language": "en",
                "data": base64.b64encode(full_text(version).encode()).decode(),
                "title": f"Report version {version.version} ({version.kind})",
            }
        ],
        "contained": [_device(version), *observations],
    }
    if study.patient_id:
        resource["subject"] = {"identifier": {"value": study.patient_id}, "display": study.patient_name or None}
        if resource["subject"]["display"] is None:
            del resource["subject"]["display"]
    if observations:
        resource["result"] = [{"reference": f"#{o['id']}"} for o in observations]
    if version.status in ("F", "C") and version.verifier:
        resource["resultsInterpreter"] = [{"display": version.verifier}]
        if version.verified_at is not None:
            resource["issued"] = version.verified_at.isoformat()
    validate(resource)
    return resource


def validate(resource: dict[str, Any]) -> None:
    """Refuse (ValueError) what the FHIR models refuse, contained resources included."""
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except ValidationError as exc:
        raise ValueError(
            f"invalid FHIR {resource['resourceType']}: {exc.error_count()} errors: {exc.errors()[0]['loc']}"
        ) from exc


def push(base_url: str, resource: dict[str, Any], *, token: str | None, timeout_s: float) -> str:
    """PUT the DiagnosticReport to the FHIR server; 200/201 is success, anything else a ``DeliveryError``."""
    url = f"{base_url.rstrip('/')}/DiagnosticReport/{resource['id']}"
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.put(url, json=resource, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"FHIR PUT to {url} failed: {type(exc).__name__}: {exc}") from exc
    if response.status_code not in (200, 201):
        raise DeliveryError(f"FHIR server answered {response.status_code} to PUT DiagnosticReport", _outcome(response))
    return f"{response.status_code} (FHIR DiagnosticReport {resource['status']})"


def _outcome(response: httpx.Response) -> str:
    """The OperationOutcome's first diagnostic, else the start of the body."""
    try:
        body = response.json()
        issue = (body.get("issue") or [{}])[0]
        return str(issue.get("diagnostics") or issue.get("details", {}).get("text") or body)[:300]
    except ValueError:
        return response.text[:300]


def send(delivery: Delivery, base_url: str, token: str | None, timeout_s: float) -> str:
    """The outbox's entry point for a FHIR destination."""
    if delivery.study is None or delivery.version is None:
        raise DeliveryError("a FHIR row carries a report version")
    return push(base_url, diagnostic_report(delivery.study, delivery.version), token=token, timeout_s=timeout_s)
