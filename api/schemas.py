"""Request and response bodies (pydantic), kept apart from the registry's SQLAlchemy models.

Patient name and ID are shown to authenticated users (the page needs them to match the film) but
never logged; the audit log records who saw which study.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from workers.models.prompts import CHEXPERT_LABELS

#: Longest question accepted, in characters (a long question is almost always a pasted report).
MAX_QUESTION_CHARS = 2000
MAX_REPORT_CHARS = 20000


def _utc(value: datetime) -> datetime:
    # The registry stores UTC; SQLite hands it back without an offset, and RFC 3339 needs one.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


UTCDateTime = Annotated[datetime, AfterValidator(_utc)]

#: Free text from a user (a report, an impression, a question): no NUL or other control characters
#: (tab and newlines allowed). They have no place in a report, break PostgreSQL text columns and would
#: travel into the SR. A pattern, so that the OpenAPI document states the rule too.
NO_CONTROL_CHARACTERS = r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F]*$"
Text = Annotated[str, Field(pattern=NO_CONTROL_CHARACTERS)]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class StudySummary(_Out):
    id: int
    study_instance_uid: str
    state: str
    reason: str | None
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    created_at: UTCDateTime
    updated_at: UTCDateTime
    latest_report_version: int | None = None
    verified: bool | None = None


class StudyPage(BaseModel):
    items: list[StudySummary]
    total: int
    offset: int
    limit: int


class InstanceOut(_Out):
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str | None
    transfer_syntax_uid: str
    size_bytes: int
    received_at: UTCDateTime
    attributes: dict[str, Any]
    selected: bool = False


class EventOut(_Out):
    from_state: str | None
    to_state: str
    reason: str | None
    at: UTCDateTime


class StudyDetail(StudySummary):
    instances: list[InstanceOut]
    history: list[EventOut]
    selected_instance_id: int | None


class RerunOut(BaseModel):
    study_id: int
    state: str
    enqueued: bool = Field(description="False when the task could not be sent now; the reconciler re-sends QUEUED studies.")


class ExportOut(_Out):
    id: int
    destination: str
    state: str
    attempts: int
    last_error: str | None
    sent_at: UTCDateTime | None


class ReportOut(BaseModel):
    id: int
    study_id: int
    version: int
    kind: str
    author: str
    verified: bool
    verifier: str | None
    verified_at: UTCDateTime | None
    created_at: UTCDateTime
    findings_text: str
    impression_text: str | None
    text: str = Field(description="The report as plain text (reporting.render.report_text).")
    document: dict[str, Any] = Field(description="The report as JSON (reporting.render.report_json).")
    sr_url: str | None
    exports: list[ExportOut]


class ReportVersions(BaseModel):
    study_id: int
    current_version: int
    versions: list[ReportOut]


class NewVersion(BaseModel):
    """A corrected text: a model answer the radiologist accepted ('ai_correction') or typed ('edit')."""

    kind: Literal["ai_correction", "edit"] = "edit"
    findings_text: Text = Field(min_length=1, max_length=MAX_REPORT_CHARS)
    impression_text: Text | None = Field(None, max_length=MAX_REPORT_CHARS)
    source_turn_id: int | None = Field(None, ge=1, le=2_147_483_647, description="The dialog turn whose answer this text comes from.")
    base_version: int | None = Field(None, ge=1, description="The version this was based on; 409 when it is no longer current.")


class Approval(BaseModel):
    """Approve the current version as is, or with a final text (then that text is what is signed)."""

    findings_text: Text | None = Field(None, min_length=1, max_length=MAX_REPORT_CHARS)
    impression_text: Text | None = Field(None, max_length=MAX_REPORT_CHARS)
    base_version: int = Field(
        ..., ge=1, description="The version the radiologist read and signs; 409 when it is no longer current "
        "(nobody signs a text they have not seen).",
    )


class Task(str, enum.Enum):
    free = "free"
    correction = "correction"
    yes_no = "yes_no"
    list = "list"
    impression = "impression"
    easy_language = "easy_language"
    summary = "summary"
    view = "view"


class Question(BaseModel):
    """A free question. ``max_length`` is not set here so an over-long one gets a clear 413."""

    question: Text = Field(min_length=1)
    stream: bool = Field(False, description="Answer as Server-Sent Events instead of one JSON body.")
    wait_seconds: float = Field(60.0, ge=0, le=300, description="How long to wait for the answer (non-streamed).")


#: The CheXpert findings the model was instruction-tuned to correct and to answer yes/no about.
FindingLabel = Literal[tuple(label for label in CHEXPERT_LABELS if label != "No Finding")]  # type: ignore[valid-type]


class _Action(BaseModel):
    stream: bool = Field(False, description="Answer as Server-Sent Events instead of one JSON body.")
    wait_seconds: float = Field(60.0, ge=0, le=300)


class CorrectionAction(_Action):
    """Include ``add`` and remove ``remove`` (at least one finding in all)."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["add"], "properties": {"add": {"minItems": 1}}},
        {"required": ["remove"], "properties": {"remove": {"minItems": 1}}},
    ]})

    action: Literal["correction"]
    add: list[FindingLabel] = Field(default_factory=list, max_length=13, description="findings to include")
    remove: list[FindingLabel] = Field(default_factory=list, max_length=13, description="findings to remove")

    @model_validator(mode="after")
    def _something_to_correct(self) -> CorrectionAction:
        if not self.add and not self.remove:
            raise ValueError("a correction needs at least one finding in 'add' or 'remove'")
        return self


class YesNoAction(_Action):
    """The question "Is there any <finding>?" about one CheXpert finding."""

    action: Literal["yes_no"]
    finding: FindingLabel


class FixedAction(_Action):
    """The fixed prompts: list findings, impression, easy language, summary, view."""

    action: Literal["list", "impression", "easy_language", "summary", "view"]


QuickAction = Annotated[CorrectionAction | YesNoAction | FixedAction, Field(discriminator="action")]


class TurnOut(_Out):
    id: int
    conversation_id: int
    task: str
    question: str
    answer: str | None
    state: str
    error: str | None
    created_at: UTCDateTime
    answered_at: UTCDateTime | None


class ConversationOut(BaseModel):
    id: int
    study_id: int
    user: str
    seed_report_id: int | None
    seed_report_version: int | None
    created_at: UTCDateTime
    turns: list[TurnOut]
    estimated_tokens: int
    max_context_tokens: int


class ModelTask(BaseModel):
    prompt: str | None = Field(description="The exact question sent; null when built from the request.")
    max_new_tokens: int


class ModelOut(BaseModel):
    """What the configured model can do (workers.models.capabilities): the page hides the rest."""

    backend: str
    model_name: str
    findings_classifier: bool = Field(description="False: no coded findings in its SRs, no finding actions.")
    tasks: dict[str, ModelTask] = Field(description="Dialog tasks it was trained for; 'free' is always there.")
    context_tokens: int
    image_tokens: int


class AuditOut(_Out):
    id: int
    at: UTCDateTime
    actor: str
    role: str | None
    action: str
    study_id: int | None
    detail: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditOut]
    total: int
    offset: int
    limit: int


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
    workers: list[dict[str, Any]] = Field(default_factory=list)


#: Registry ids are 32-bit on PostgreSQL: a larger one cannot exist, so it is a 422, not a database error.
MAX_ID = 2_147_483_647
StudyId = Annotated[int, Path(ge=1, le=MAX_ID, description="The study's registry id")]
Version = Annotated[int, Path(ge=1, le=MAX_ID, description="Report version number (1 = AI draft)")]
TurnId = Annotated[int, Path(ge=1, le=MAX_ID, description="Dialog turn id")]
