"""What every channel shares: the error the outbox retries on, a version's snapshot, and the result status.

Result status, one rule for every channel (HL7 OBR-25/OBX-11, FHIR DiagnosticReport.status):

- a version not verified, with no approved version before it: P / preliminary (the AI draft, its
  corrections and edits: unverified AI output);
- the first approved version: F / final, with the verifying radiologist;
- an approved version after an earlier approval: C / amended (a signed correction of a signed report);
- a version not verified after an approval: not sent (None). The RIS and the FHIR server keep the signed
  report until the radiologist signs the change, which then goes as C / amended.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

ResultStatus = Literal["P", "F", "C"]
FHIR_STATUS: dict[str, str] = {"P": "preliminary", "F": "final", "C": "amended"}


class DeliveryError(RuntimeError):
    """One failed attempt, with a reason an operator can act on (the outbox retries, then DEAD).

    ``peer_text`` is what the other side said (a RIS's MSA-3, an OperationOutcome, a response body): kept
    with the row for the operator, never logged, since a peer may quote patient data back.
    """

    def __init__(self, reason: str, peer_text: str | None = None) -> None:
        super().__init__(f"{reason}: {peer_text}" if peer_text else reason)
        self.loggable = reason


def result_status(verified: bool, approved_before: bool) -> ResultStatus | None:
    """The status a version goes out with, or None when it is not sent (see the module docstring)."""
    if verified:
        return "C" if approved_before else "F"
    return None if approved_before else "P"


@dataclass(frozen=True)
class StudyView:
    """The study's identifiers as received (patient data: never logged)."""

    id: int
    study_instance_uid: str
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None
    study_description: str | None = None


@dataclass(frozen=True)
class VersionView:
    """One report version as the channels carry it (immutable once written)."""

    id: int
    version: int
    kind: str
    status: ResultStatus
    findings_text: str
    impression_text: str | None
    findings: list[dict[str, Any]]
    coded: bool  # the SR of this version carries the classifier's coded findings (the AI's own versions)
    author: str
    verifier: str | None
    verified_at: datetime | None
    created_at: datetime
    sop_instance_uid: str
    model_name: str | None
    model_version: str | None
    model_hash: str | None
    status_line: str  # the SR's own status line (unverified AI output until approved; routing notes)


@dataclass(frozen=True)
class Delivery:
    """One outbox row to send: what (a version of a study, or a frozen event body) and its stable id."""

    export_id: int
    study: StudyView | None
    version: VersionView | None = None
    event: str | None = None
    payload: dict[str, Any] | None = None

    @property
    def idempotency_key(self) -> str:
        """Stable across retries of this row: the receiver drops a repeat (at-least-once delivery)."""
        if self.payload and self.payload.get("id"):
            return str(self.payload["id"])
        return f"radialog-export-{self.export_id}"
