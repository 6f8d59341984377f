"""Study assembly: the stable-study rule, the image choice in the registry, re-opening, the enqueue hook."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.assembly import StudyAssembler
from dicom_node.header import header_of
from dicom_node.records import record_instance
from radialog.registry import Registry, Study, StudyState, utcnow
from radialog.settings import Settings
from radialog.synthetic import make_cxr
from tests.support.dicom_peers import store_all
from tests.support.node import running_node
from tests.support.polling import wait_for


def _receive(registry: Registry, study_uid: str, at: datetime, **kw: Any) -> int:
    ds = make_cxr(rows=16, cols=16, study_uid=study_uid, **kw)
    with registry.session() as session:
        _, instance_id = record_instance(
            session,
            header_of(ds),
            rel_path=f"{study_uid}/{ds.SOPInstanceUID}.dcm",
            size_bytes=1,
            calling_ae_title="T",
            now=at,
        )
    return instance_id


def _study(registry: Registry, study_uid: str) -> Study:
    with registry.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        _ = study.events
        return study


def test_quiet_study_is_queued_with_its_frontal_image(settings: Settings, registry: Registry) -> None:
    queued: list[int] = []
    assembler = StudyAssembler(registry, settings, enqueue=queued.append)
    uid, t0 = generate_uid(), utcnow()
    _receive(registry, uid, t0, view_position="LL")
    pa = _receive(registry, uid, t0, view_position="PA")
    _receive(registry, uid, t0, view_position="AP")
    assert assembler.tick(t0 + timedelta(seconds=settings.stable_after / 2)) == {}
    assert _study(registry, uid).state == StudyState.RECEIVING.value
    moved = assembler.tick(t0 + timedelta(seconds=settings.stable_after + 1))
    study = _study(registry, uid)
    assert moved == {study.id: StudyState.QUEUED} and queued == [study.id]
    assert study.state == StudyState.QUEUED.value and study.selected_instance_id == pa
    assert [(e.from_state, e.to_state) for e in study.events] == [
        (None, "RECEIVING"),
        ("RECEIVING", "STABLE"),
        ("STABLE", "QUEUED"),
    ]
    assert assembler.tick(t0 + timedelta(seconds=60)) == {}, "assembly is done once"


def test_lateral_only_is_skipped_then_reopened_by_a_late_frontal(settings: Settings, registry: Registry) -> None:
    assembler = StudyAssembler(registry, settings)
    uid, t0 = generate_uid(), utcnow()
    _receive(registry, uid, t0, view_position="LATERAL")
    assembler.tick(t0 + timedelta(seconds=10))
    study = _study(registry, uid)
    assert (study.state, study.reason, study.selected_instance_id) == ("SKIPPED", "lateral view only", None)
    t1 = t0 + timedelta(seconds=20)
    pa = _receive(registry, uid, t1, view_position="PA")
    assert _study(registry, uid).state == StudyState.RECEIVING.value
    assembler.tick(t1 + timedelta(seconds=10))
    study = _study(registry, uid)
    assert (study.state, study.selected_instance_id) == ("QUEUED", pa)


def test_not_a_chest_is_skipped_with_the_body_part(settings: Settings, registry: Registry) -> None:
    uid, t0 = generate_uid(), utcnow()
    _receive(registry, uid, t0, body_part="KNEE", view_position="AP")
    StudyAssembler(registry, settings).tick(t0 + timedelta(seconds=10))
    study = _study(registry, uid)
    assert (study.state, study.reason) == ("SKIPPED", "no chest image: body part KNEE")


def test_late_instance_for_queued_study_is_recorded_without_reopening(
    settings: Settings, sqlite_registry: Registry
) -> None:
    uid, t0 = generate_uid(), utcnow()
    _receive(sqlite_registry, uid, t0)
    StudyAssembler(sqlite_registry, settings).tick(t0 + timedelta(seconds=10))
    _receive(sqlite_registry, uid, t0 + timedelta(seconds=20))
    study = _study(sqlite_registry, uid)
    with sqlite_registry.session() as session:
        assert len(session.get(Study, study.id).instances) == 2  # type: ignore[union-attr]
    assert study.state == StudyState.QUEUED.value


def test_instance_arriving_during_assembly_keeps_study_receiving(settings: Settings, sqlite_registry: Registry) -> None:
    """The assembler re-reads last_instance_at after taking the row: a fresh instance wins."""
    uid, t0 = generate_uid(), utcnow()
    _receive(sqlite_registry, uid, t0)
    study_id = _study(sqlite_registry, uid).id
    assembler = StudyAssembler(sqlite_registry, settings)
    assert assembler.assemble(study_id, now=t0) is None
    assert _study(sqlite_registry, uid).state == StudyState.RECEIVING.value
    assert assembler.assemble(study_id, now=t0 + timedelta(seconds=10)) is StudyState.QUEUED


def test_enqueue_errors_leave_study_queued(settings: Settings, sqlite_registry: Registry) -> None:
    def broken(study_id: int) -> None:
        raise ConnectionError("broker down")

    uid, t0 = generate_uid(), utcnow()
    _receive(sqlite_registry, uid, t0)
    StudyAssembler(sqlite_registry, settings, enqueue=broken).tick(t0 + timedelta(seconds=10))
    assert _study(sqlite_registry, uid).state == StudyState.QUEUED.value


def test_running_node_queues_a_received_study(settings: Settings, registry: Registry) -> None:
    done = threading.Event()
    queued: list[int] = []

    def enqueue(study_id: int) -> None:
        queued.append(study_id)
        done.set()

    uid = generate_uid()
    with running_node(settings, registry, enqueue=enqueue, assembler_interval=0.1) as node:
        statuses = store_all(
            node.port, [make_cxr(rows=32, cols=32, study_uid=uid, view_position=v) for v in ("LL", "PA")]
        )
        assert statuses == [0, 0]
        assert done.wait(60), "the assembler did not queue the study"
    study = _study(registry, uid)
    assert queued == [study.id] and study.state == StudyState.QUEUED.value


def test_overdue_studies_move_on_after_restart(settings: Settings, sqlite_registry: Registry) -> None:
    uid = generate_uid()
    _receive(sqlite_registry, uid, utcnow() - timedelta(hours=1))  # received before a crash
    with running_node(settings, sqlite_registry, assembler_interval=0.05):
        wait_for(
            lambda: _study(sqlite_registry, uid).state != "RECEIVING",
            what="the overdue study moved on",
            timeout=30,
            interval=0.05,
        )
    assert _study(sqlite_registry, uid).state == StudyState.QUEUED.value
