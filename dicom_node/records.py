"""Registry writes for received instances: study upsert (or re-open), instance row, duplicates.

Used by the C-STORE handler and by start-up recovery. The caller owns the session/transaction.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node.header import Header, valid_or_none
from radialog.registry import Instance, Study, StudyEvent, StudyState, transition

#: A late instance moves a study from these states back to RECEIVING (it has not been queued yet).
REOPENABLE = (StudyState.STABLE.value, StudyState.SKIPPED.value)


class Seen(enum.Enum):
    """What the registry already knows about a SOP Instance UID."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same study: already stored, answer Success
    CONFLICT = "conflict"  # same SOP Instance UID recorded for another study: refuse, never overwrite


def seen_before(session: Session, sop_instance_uid: str, study_instance_uid: str) -> Seen:
    """Classify an incoming SOP Instance UID against the registry."""
    row = session.execute(
        select(Study.study_instance_uid)
        .join(Instance, Instance.study_id == Study.id)
        .where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()
    if row is None:
        return Seen.NEW
    return Seen.DUPLICATE if row[0] == study_instance_uid else Seen.CONFLICT


def record_instance(
    session: Session,
    header: Header,
    *,
    rel_path: str,
    size_bytes: int,
    calling_ae_title: str | None,
    now: datetime,
) -> tuple[int, int]:
    """Insert the instance and create, touch or re-open its study; returns (study id, instance id).

    The study row is written *before* its state is read, so the read happens under the row's write
    lock (PostgreSQL) or the database write lock (SQLite): an assembler that is moving the same study
    to STABLE either finishes first (and we re-open it) or waits for us (and sees this instance).
    Raises ``IntegrityError`` when a concurrent association inserted the same study or instance; the
    caller retries in a new transaction.
    """
    assert header.study_instance_uid is not None and header.sop_instance_uid is not None
    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == header.study_instance_uid))
    if study_id is None:
        study = Study(
            study_instance_uid=header.study_instance_uid,
            state=StudyState.RECEIVING.value,
            patient_name=header.patient_name,
            patient_id=header.patient_id,
            accession_number=header.accession_number,
            study_date=header.study_date,
            study_description=header.study_description,
            created_at=now,
            updated_at=now,
            last_instance_at=now,
        )
        session.add(study)
        session.flush()
        study_id = study.id
        session.add(
            StudyEvent(
                study_id=study_id,
                from_state=None,
                to_state=StudyState.RECEIVING.value,
                reason="first instance received",
                at=now,
            )
        )
    else:
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(last_instance_at=now)
            .execution_options(synchronize_session=False)
        )
    instance = Instance(
        study_id=study_id,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid or "",
        series_instance_uid=valid_or_none(header.series_instance_uid),
        transfer_syntax_uid=header.transfer_syntax_uid or "",
        path=rel_path,
        size_bytes=size_bytes,
        calling_ae_title=(calling_ae_title or None),
        received_at=now,
        attributes=header.attributes,
    )
    session.add(instance)
    session.flush()
    state = session.scalar(select(Study.state).where(Study.id == study_id).execution_options(populate_existing=True))
    if state in REOPENABLE:
        study_obj = session.get(Study, study_id)
        if study_obj is not None:
            session.refresh(study_obj)
        transition(session, study_id, StudyState.RECEIVING, "new instance arrived")
    return study_id, instance.id
