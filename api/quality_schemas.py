"""Response bodies of the quality (agreement) and operations routes, apart from the SQLAlchemy models."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class ProportionOut(BaseModel):
    k: int
    n: int
    value: float | None = Field(description="k / n; null when n is 0")
    ci95: list[float] | None = Field(description="95% Wilson score interval [low, high]; null when n is 0")


class FindingAgreement(BaseModel):
    """One CheXpert finding over the period, the radiologist's verdict as reference."""

    label: str
    n: int = Field(description="Drafts with a verdict on this finding")
    ai_present: int
    radiologist_present: int
    tp: int
    fp: int
    fn: int
    tn: int
    agreement: ProportionOut
    sensitivity: ProportionOut
    specificity: ProportionOut
    ppv: ProportionOut


class EditDistance(BaseModel):
    median: float | None
    max: int | None
    median_per_draft_char: float | None = Field(description="Edit distance / draft length, median over drafts")


class DraftsOut(BaseModel):
    approved: int = Field(description="AI drafts approved in the period (each counted once, its latest approval)")
    unchanged: int = Field(description="Signed exactly as drafted (character edit distance 0)")
    edited: int
    share_unchanged: ProportionOut
    with_checklist: int = Field(description="Approvals with a verdict on every finding of the draft")
    edit_distance: EditDistance


class PeriodDrafts(BaseModel):
    approved: int
    unchanged: int


class PeriodFinding(BaseModel):
    agree: int
    n: int
    agreement: ProportionOut


class PeriodOut(BaseModel):
    period: str = Field(description="First day of the period (UTC), YYYY-MM-DD")
    drafts: PeriodDrafts
    findings: dict[str, PeriodFinding]


class AgreementOut(BaseModel):
    """How often radiologists agreed with the AI's findings, and how much they changed its text."""

    from_: datetime = Field(alias="from")
    to: datetime
    backend: str | None
    bucket: Literal["day", "week"]
    drafts: DraftsOut
    findings: list[FindingAgreement]
    timeline: list[PeriodOut]
    backends: list[str] = Field(description="Model names with approved drafts (values for `backend`)")
    method: str = Field(description="How the intervals are computed")


class ChecklistItemOut(BaseModel):
    label: str
    ai_present: bool
    probability: float | None
    stated: Literal["present", "absent"] | None = Field(
        description="What the version's text says about the finding in the model's phrase; null: nothing clear"
    )
    suggestion: Literal["agree", "disagree"] | None = Field(description="The verdict the text implies, if any")
    evidence: str | None = Field(description="The clause(s) of the text the suggestion comes from")


class ChecklistOut(BaseModel):
    """The AI draft's findings to judge when approving ``version`` (empty: the model has no classifier)."""

    study_id: int
    version: int
    draft_version: int | None
    model_name: str | None
    items: list[ChecklistItemOut]


# -- operations ----------------------------------------------------------------------------------------
class HourCounts(BaseModel):
    hour: datetime
    counts: dict[str, int] = Field(description="Studies received in this hour, by their state now")


class Percentiles(BaseModel):
    n: int
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    max: float | None


class LatencyOut(BaseModel):
    image_to_sr: Percentiles = Field(description="Seconds from a study's last image to its AI draft SR written")
    image_to_pacs: Percentiles = Field(
        description="Seconds from the last image to the draft SR accepted by a destination"
    )


class QueuesOut(BaseModel):
    available: bool
    depths: dict[str, int]
    error: str | None = None


class WorkerOut(BaseModel):
    name: str
    model: str | None
    version: str | None
    device: str | None
    tiny: bool | None
    slots: dict[str, int] = Field(description="KV-cache slots of the worker's engine per kind (report, dialog)")


class WorkersOut(BaseModel):
    available: bool
    ready: list[WorkerOut]
    error: str | None = None


class ReasonCount(BaseModel):
    state: str
    reason: str
    count: int


class DeadExport(BaseModel):
    destination: str
    reason: str
    count: int


class OverviewOut(BaseModel):
    """The service at a glance (admins): throughput, latency, queues, workers, what went wrong."""

    generated_at: datetime
    hours: int
    from_: datetime = Field(alias="from")
    states: list[str]
    studies_per_hour: list[HourCounts]
    latency: LatencyOut
    queues: QueuesOut
    workers: WorkersOut
    not_reported: list[ReasonCount] = Field(
        description="Studies received in the window that ended FAILED or SKIPPED, by reason"
    )
    exports: dict[str, int] = Field(description="Outbox rows by state (all time)")
    dead_exports: list[DeadExport] = Field(description="DEAD outbox rows by destination and last error (all time)")
