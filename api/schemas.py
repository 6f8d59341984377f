"""Request and response bodies (pydantic), kept apart from the registry's SQLAlchemy models.

Patient name and ID are shown to authenticated users (the page needs them to match the film) but
never logged; the audit log records who saw which study.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from radialog.chexpert import CHEXPERT_LABELS, NO_FINDING
from radialog.routing import Priority
from reporting.text import MAX_REPORT_CHARS, TEXT_PATTERN, clean_text

#: Longest question accepted, in characters (a long question is almost always a pasted report).
MAX_QUESTION_CHARS = 2000


#: The instants a query bound is kept within: a bound in year 1 would overflow the period arithmetic (a 500;
#: the longest period, 366 days, is subtracted from it). A schema-valid bound is never refused: it is clamped,
#: which changes no answer (the registry holds nothing from those years).
_EARLIEST = datetime(2, 1, 3, tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


def _query_instant(value: datetime) -> datetime:
    """A query bound in UTC (PostgreSQL refuses offsets beyond +-15:59 that ISO 8601 and Python allow),
    clamped to [0002-01-03, 9999-12-31]."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        utc = aware.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC, 9999-12-31T23:00-02:00 after 9999
        utc = _EARLIEST if aware.year < 5000 else _LATEST
    return min(max(utc, _EARLIEST), _LATEST)


#: A date-time in a query string, converted to UTC and clamped (see ``_EARLIEST``).
QueryInstant = Annotated[datetime, AfterValidator(_query_instant)]

#: Free text from a user (a report, an impression, a question): only what ``reporting.text`` keeps, i.e.
#: what a DICOM text value may hold (CR, LF, FF and every printable character; no TAB, NUL, other C0 or
#: C1 controls, DEL). Such characters have no place in a report, break PostgreSQL text columns and would
#: make the SR invalid. A pattern, so that the OpenAPI document states the rule too; lone surrogates are
#: refused by pydantic as invalid strings.
NO_CONTROL_CHARACTERS = TEXT_PATTERN
Text = Annotated[str, Field(pattern=NO_CONTROL_CHARACTERS)]
#: Text read back from the registry, shown as the rule cleans it (rows stored before the rule existed
#: may hold control bytes from the model): what the API shows is what can be approved.
ShownText = Annotated[str, AfterValidator(clean_text)]


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
    priority: Priority = Field(Priority.ROUTINE, description="From the routing rules: HIGH is read first.")
    routing_rule: str | None = Field(
        None, description="The routing rule that decided (None: no rule matched or not assembled yet)."
    )


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
    enqueued: bool = Field(
        description="False when the task could not be sent now; the reconciler re-sends QUEUED studies."
    )


class ExportOut(_Out):
    id: int
    destination: str
    event: str | None = None
    state: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None


class DiffPart(BaseModel):
    """A run of words: the same in both versions, inserted by this version, or deleted by it."""

    op: Literal["equal", "insert", "delete"]
    text: str


class VersionChanges(BaseModel):
    """Word-level changes from the predecessor (whitespace-only changes are not shown)."""

    predecessor_version: int
    findings: list[DiffPart]
    impression: list[DiffPart]


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
    findings_text: ShownText
    impression_text: ShownText | None
    text: str = Field(description="The report as plain text (reporting.render.report_text).")
    document: dict[str, Any] = Field(description="The report as JSON (reporting.render.report_json).")
    sr_url: str | None
    exports: list[ExportOut]
    changes: VersionChanges | None = Field(
        None, description="What changed from the predecessor version, word by word (none for the first version)."
    )


class ReportVersions(BaseModel):
    study_id: int
    current_version: int
    versions: list[ReportOut]


class NewVersion(BaseModel):
    """A corrected text: a model answer the radiologist accepted ('ai_correction') or typed ('edit')."""

    kind: Literal["ai_correction", "edit"] = "edit"
    findings_text: Text = Field(min_length=1, max_length=MAX_REPORT_CHARS)
    impression_text: Text | None = Field(None, max_length=MAX_REPORT_CHARS)
    source_turn_id: int | None = Field(
        None, ge=1, le=2_147_483_647, description="The dialog turn whose answer this text comes from."
    )
    base_version: int | None = Field(
        None, ge=1, description="The version this was based on; 409 when it is no longer current."
    )


class FindingVerdictIn(BaseModel):
    """One line of the approval checklist: the AI's call on a finding as shown, and the radiologist's verdict."""

    label: str = Field(min_length=1, max_length=64, description="A CheXpert label of the AI draft's findings")
    ai_present: bool = Field(description="The AI's call as displayed (409 when it is not the draft's)")
    verdict: Literal["agree", "disagree"]


class Approval(BaseModel):
    """Sign exactly the version on screen: ``base_version`` and, as a check, the text displayed.

    A text that is not the text of ``base_version`` (as the API shows it) is refused with 409: a change
    is saved as a new version first, displayed, and that version is approved.
    """

    findings_text: Text | None = Field(
        None,
        max_length=MAX_REPORT_CHARS,
        description="The findings as displayed; 409 when they are not the text of base_version. Left out: not checked.",
    )
    impression_text: Text | None = Field(
        None,
        max_length=MAX_REPORT_CHARS,
        description='The impression as displayed ("" = none); 409 when it differs. Left out: not checked.',
    )
    base_version: int = Field(
        ...,
        ge=1,
        description="The version the radiologist read and signs; 409 when it is no longer current "
        "(nobody signs a text they have not seen).",
    )
    checklist: list[FindingVerdictIn] | None = Field(
        None,
        max_length=64,
        description="A verdict for every CheXpert finding of the AI draft (GET .../report/"
        "checklist), stored with this version; left out: none recorded. 422 when incomplete.",
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
if TYPE_CHECKING:  # a Literal built at run time from the one label list; a type checker sees its values' type
    FindingLabel = str
else:
    FindingLabel = Literal[tuple(label for label in CHEXPERT_LABELS if label != NO_FINDING)]


class _Action(BaseModel):
    stream: bool = Field(False, description="Answer as Server-Sent Events instead of one JSON body.")
    wait_seconds: float = Field(60.0, ge=0, le=300)


class CorrectionAction(_Action):
    """Include ``add`` and remove ``remove`` (at least one finding in all)."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["add"], "properties": {"add": {"minItems": 1}}},
                {"required": ["remove"], "properties": {"remove": {"minItems": 1}}},
            ]
        }
    )

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
    question: ShownText
    answer: ShownText | None
    state: str
    error: str | None
    error_kind: str | None = Field(
        default=None,
        description="Why the turn failed, as a type (radialog.registry.ErrorKind: CONTEXT_TOO_LONG, "
        "UNSUPPORTED_TASK, NO_INPUT, OUT_OF_MEMORY, CANCELLED, MODEL_ERROR, BROKER_UNAVAILABLE, WORKER_LOST, "
        "NOT_TAKEN); tell failures apart by it, not by the words of 'error'. Null unless FAILED, and for turns "
        "failed before the kind was recorded.",
    )
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


class Me(BaseModel):
    """Who the key belongs to: the page shows it, so nobody works under a colleague's key unawares."""

    name: str
    role: str


class WindowPreset(BaseModel):
    id: str = Field(description="'lut:N' (a VOI LUT of the header), 'window:N' (a header window) or 'full'")
    label: str
    center: float = Field(description="Window centre in modality units (for a LUT: the middle of its input range)")
    width: float
    function: str = Field(description="LINEAR, LINEAR_EXACT or SIGMOID (the header's VOI LUT Function)")
    lut: bool = Field(description="True when this preset is a VOI LUT (not a linear window)")


class ImageRef(BaseModel):
    id: int
    label: str
    reported: bool = Field(description="The image the report was made from")


class ImageInfo(BaseModel):
    """What the viewer needs to show one image: size, value range, window presets, and the other
    images of the study."""

    instance_id: int
    rows: int
    columns: int
    frames: int = Field(description="Frames in the file; the viewer shows the first")
    photometric_interpretation: str
    inverse_display: bool = Field(description="Shown inverted (MONOCHROME1): the lowest value is white")
    bits_stored: int | None
    pixel_spacing: list[float] | None
    value_min: float
    value_max: float
    presets: list[WindowPreset]
    default_preset: str
    images: list[ImageRef]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
    workers: list[dict[str, Any]] = Field(default_factory=list)


#: Registry ids are 32-bit on PostgreSQL: a larger one cannot exist, so it is a 422, not a database error.
MAX_ID = 2_147_483_647
StudyId = Annotated[int, Path(ge=1, le=MAX_ID, description="The study's registry id")]
Version = Annotated[int, Path(ge=1, le=MAX_ID, description="Report version number (1 = AI draft)")]
TurnId = Annotated[int, Path(ge=1, le=MAX_ID, description="Dialog turn id")]
