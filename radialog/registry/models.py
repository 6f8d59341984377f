"""Registry tables. Column names are the vocabulary shared by node, workers, reporting and api.

Patient-identifying columns (patient name/ID, accession) live here, in the clinical database, and
never in logs. Every timestamp is timezone-aware UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from radialog.registry.types import UTCDateTime

UID = String(64)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class Study(Base):
    """One Study Instance UID and where it stands in its life (see ``states.StudyState``)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    patient_name: Mapped[str | None] = mapped_column(String(256))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)  # DICOM DA, YYYYMMDD
    study_description: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    last_instance_at: Mapped[datetime | None] = mapped_column(index=True)
    selected_instance_id: Mapped[int | None] = mapped_column(
        ForeignKey("instances.id", use_alter=True, name="fk_studies_selected_instance")
    )
    # Routing (radialog.routing): HIGH, ROUTINE or LOW, and the decision {"rule", "action", "priority",
    # "reason", "notes"} taken when the study was assembled (notes: e.g. "patient age unknown", said in the SR).
    priority: Mapped[str] = mapped_column(String(8), default="ROUTINE", server_default="ROUTINE", index=True)
    routing: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    instances: Mapped[list[Instance]] = relationship(
        back_populates="study", foreign_keys="Instance.study_id", order_by="Instance.id"
    )
    selected_instance: Mapped[Instance | None] = relationship(foreign_keys=[selected_instance_id])
    events: Mapped[list[StudyEvent]] = relationship(back_populates="study", order_by="StudyEvent.id")
    reports: Mapped[list[Report]] = relationship(back_populates="study", order_by="Report.version")


class Instance(Base):
    """One received SOP instance, stored once in the spool exactly as it arrived."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))  # relative to the spool directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime]
    # Header fields used to choose the image to report (modality, view position, body part, ...).
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)

    study: Mapped[Study] = relationship(back_populates="instances", foreign_keys=[study_id])


class StudyEvent(Base):
    """One state transition, kept forever: the study's history shown by the API."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime]

    study: Mapped[Study] = relationship(back_populates="events")


class Job(Base):
    """A report job: one per (study, model name, model version), whatever the broker does."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "model_name", "model_version", name="uq_job_study_model"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Lease of the worker running the job, renewed while it runs; the reconciler re-queues a RUNNING
    # job whose heartbeat is older than the lease (its worker died), whatever the broker remembers.
    heartbeat_at: Mapped[datetime | None] = mapped_column(index=True)
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The study's priority as a rank (0 HIGH, 1 ROUTINE, 2 LOW): batches take waiting jobs in this order.
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"), index=True)
    # Which study crashed the worker (workers/crashes.py): how the current claim runs (None = not started,
    # "batch", "alone"); whether the job runs alone from now on (its worker died while it ran with others);
    # worker deaths while it ran alone (charged); claims lost with a worker that died while the job waited
    # or ran in company (not charged: ``attempts - lost_claims`` is what counts against the retry limit).
    run_mode: Mapped[str | None] = mapped_column(String(8))
    isolated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    lost_claims: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class Report(Base):
    """One version of a study's report: the AI draft (version 1) and every later version.

    ``kind`` (``states.ReportKind``) is ``ai_draft``, ``ai_correction``, ``edit`` (typed by a radiologist) or
    ``approval``.
    ``verified`` is true only for a version a radiologist approved.
    """

    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("study_id", "version", name="uq_report_study_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # states.ReportKind
    predecessor_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    source_instance_uid: Mapped[str | None] = mapped_column(UID)
    findings_text: Mapped[str] = mapped_column(Text)
    impression_text: Mapped[str | None] = mapped_column(Text)
    # CheXpert classifier output: [{"label": ..., "probability": ..., "present": ...}, ...]
    findings: Mapped[list[Any]] = mapped_column(default=list)
    author: Mapped[str] = mapped_column(String(128))  # model name or user name
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    verifier: Mapped[str | None] = mapped_column(String(128))
    verified_at: Mapped[datetime | None]
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_hash: Mapped[str | None] = mapped_column(String(64))
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sr_path: Mapped[str | None] = mapped_column(String(512))  # relative to settings.sr_dir
    created_at: Mapped[datetime]

    study: Mapped[Study] = relationship(back_populates="reports")
    predecessor: Mapped[Report | None] = relationship(remote_side=[id])
    exports: Mapped[list[Export]] = relationship(back_populates="report", order_by="Export.id")


class Export(Base):
    """Outbox row: one report version (or one event) for one destination, retried with backoff until sent
    or dead. Report versions go to every channel kind (SR to a PACS, ORU to a RIS, DiagnosticReport to a
    FHIR server, a webhook event); ``event`` and ``payload`` are set for webhook rows, whose body is frozen
    when the row is made (its id is the receiver's idempotency key). Events that are not about one version
    (study.failed, export.dead) have no ``report_id``."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("report_id", "destination", name="uq_export_report_destination"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"), index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    event: Mapped[str | None] = mapped_column(String(32))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]

    report: Mapped[Report | None] = relationship(back_populates="exports")


class Conversation(Base):
    """A radiologist's dialog with the model about one study, seeded with a report version."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    user: Mapped[str] = mapped_column(String(128))
    seed_report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"))
    created_at: Mapped[datetime]

    turns: Mapped[list[DialogTurn]] = relationship(back_populates="conversation", order_by="DialogTurn.id")


class DialogTurn(Base):
    """One question and, once the worker answered, its answer."""

    __tablename__ = "dialog_turns"

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    task: Mapped[str] = mapped_column(String(32))  # free, correction, yes_no, list, impression, ...
    question: Mapped[str] = mapped_column(Text)  # the exact text sent to the model
    answer: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))  # states.TurnState
    error: Mapped[str | None] = mapped_column(Text)  # the reason shown to the user
    # Why it failed (states.ErrorKind), set from the exception's type: what the API's status depends on.
    error_kind: Mapped[str | None] = mapped_column(String(32))
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    answered_at: Mapped[datetime | None]

    conversation: Mapped[Conversation] = relationship(back_populates="turns")


class ApiKey(Base):
    """An API user: only the SHA-256 of the key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # reader, radiologist, admin
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class AuditEntry(Base):
    """Who read, asked, changed or approved what, and when."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(128))
    role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApprovalReview(Base):
    """What one approval says about the AI draft it signed off, stored with the approval version in the
    same transaction: how far the signed text is from the draft, and (when the radiologist filled the
    checklist) a verdict per CheXpert finding of the draft (``FindingVerdict``). The agreement figures
    (``reporting.quality``) are computed from these rows only."""

    __tablename__ = "approval_reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), unique=True)  # the approval version
    draft_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)  # the AI draft it judged
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_name: Mapped[str | None] = mapped_column(String(64), index=True)  # the draft's model (backend)
    model_version: Mapped[str | None] = mapped_column(String(64))
    approved_at: Mapped[datetime] = mapped_column(index=True)
    draft_chars: Mapped[int] = mapped_column(Integer)
    approved_chars: Mapped[int] = mapped_column(Integer)
    edit_distance: Mapped[int] = mapped_column(Integer)  # Levenshtein, characters, draft -> signed text
    checklist: Mapped[bool] = mapped_column(Boolean)  # a verdict was given for every finding of the draft

    verdicts: Mapped[list[FindingVerdict]] = relationship(back_populates="review", order_by="FindingVerdict.id")


class FindingVerdict(Base):
    """The radiologist's word on one CheXpert finding of the AI draft: agree or disagree with the
    classifier, hence whether the finding is present (``radiologist_present``); ``suggested`` is what the
    page prefilled from the signed text (None: the text did not say)."""

    __tablename__ = "finding_verdicts"
    __table_args__ = (UniqueConstraint("review_id", "label", name="uq_verdict_review_label"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("approval_reviews.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    ai_present: Mapped[bool] = mapped_column(Boolean)
    ai_probability: Mapped[float | None] = mapped_column(Float)
    radiologist_present: Mapped[bool] = mapped_column(Boolean)
    agree: Mapped[bool] = mapped_column(Boolean)
    suggested: Mapped[str | None] = mapped_column(String(8))  # "agree", "disagree" or None

    review: Mapped[ApprovalReview] = relationship(back_populates="verdicts")
