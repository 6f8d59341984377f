"""Request and response bodies (pydantic), kept apart from the registry's SQLAlchemy models.

Patient name and ID are shown to authenticated users (the page needs them to match the film) but
never logged; the audit log records who saw which study.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

#: Longest question accepted, in characters (a long question is almost always a pasted report).
MAX_QUESTION_CHARS = 2000
MAX_REPORT_CHARS = 20000


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
    created_at: datetime
    updated_at: datetime
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
    received_at: datetime
    attributes: dict[str, Any]
    selected: bool = False


class EventOut(_Out):
    from_state: str | None
    to_state: str
    reason: str | None
    at: datetime


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
    sent_at: datetime | None


class ReportOut(BaseModel):
    id: int
    study_id: int
    version: int
    kind: str
    author: str
    verified: bool
    verifier: str | None
    verified_at: datetime | None
    created_at: datetime
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
    findings_text: str = Field(min_length=1, max_length=MAX_REPORT_CHARS)
    impression_text: str | None = Field(None, max_length=MAX_REPORT_CHARS)
    source_turn_id: int | None = Field(None, ge=1, le=2_147_483_647, description="The dialog turn whose answer this text comes from.")
    base_version: int | None = Field(None, ge=1, description="The version this was based on; 409 when it is no longer current.")


class Approval(BaseModel):
    """Approve the current version as is, or with a final text (then that text is what is signed)."""

    findings_text: str | None = Field(None, min_length=1, max_length=MAX_REPORT_CHARS)
    impression_text: str | None = Field(None, max_length=MAX_REPORT_CHARS)
    base_version: int | None = Field(None, ge=1)


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

    question: str = Field(min_length=1)
    stream: bool = Field(False, description="Answer as Server-Sent Events instead of one JSON body.")
    wait_seconds: float = Field(60.0, ge=0, le=300, description="How long to wait for the answer (non-streamed).")


class QuickAction(BaseModel):
    """A quick action, sent with the model's exact instruction-tuned phrasing."""

    action: Literal["correction", "yes_no", "list", "impression", "easy_language", "summary", "view"]
    add: list[str] = Field(default_factory=list, max_length=14, description="correction: findings to include")
    remove: list[str] = Field(default_factory=list, max_length=14, description="correction: findings to remove")
    finding: str | None = Field(None, max_length=100, description="yes_no: the finding asked about")
    stream: bool = False
    wait_seconds: float = Field(60.0, ge=0, le=300)


class TurnOut(_Out):
    id: int
    conversation_id: int
    task: str
    question: str
    answer: str | None
    state: str
    error: str | None
    created_at: datetime
    answered_at: datetime | None


class ConversationOut(BaseModel):
    id: int
    study_id: int
    user: str
    seed_report_id: int | None
    seed_report_version: int | None
    created_at: datetime
    turns: list[TurnOut]
    estimated_tokens: int
    max_context_tokens: int


class AuditOut(_Out):
    id: int
    at: datetime
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
