"""The node applies the routing rules (real C-STORE into a running node): the C-STORE Priority field is captured
and stored, a child is SKIPPED with the reason, a HIGH study is QUEUED at HIGH, an unknown age is queued with
the note; a trusted router's study is complete when its association is released (no quiet window), an
untrusted sender's study still waits for it, and a late instance re-opens a skipped study."""

from __future__ import annotations

import time

from pydicom.dataset import Dataset
from sqlalchemy import select

from radialog.registry import Instance, Registry, Study
from radialog.routing import AGE_UNKNOWN_NOTE, PEDIATRIC_REASON
from radialog.settings import Settings
from radialog.synthetic import make_cxr
from tests.support.dicom_peers import scu
from tests.support.node import running_node
from tests.support.polling import wait_for


def _send(port: int, datasets: list[Dataset], *, calling: str = "MODALITY", priority: int = 0) -> None:
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    assoc = scu(contexts, calling).associate("127.0.0.1", port, ae_title="RADIALOG")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds, priority=priority).Status == 0
    finally:
        assoc.release()


def _study(registry: Registry, uid: str) -> Study | None:
    with registry.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
        if study is not None:
            session.expunge(study)
        return study


def _settled(registry: Registry, uid: str) -> Study:
    return wait_for(
        lambda: (s := _study(registry, uid)) is not None and s.state in ("QUEUED", "SKIPPED") and s,
        timeout=30,
        what="study assembled",
    )


def test_rules_decide_at_assembly_with_the_store_priority_captured(settings: Settings, registry: Registry) -> None:
    queued: list[int] = []
    settings = settings.model_copy(update={"stable_after": 0.3})
    child, urgent, unknown = make_cxr(), make_cxr(), make_cxr()
    child.PatientAge = "009Y"
    unknown.PatientBirthDate = ""
    with running_node(settings, registry, enqueue=queued.append, assembler_interval=0.1) as node:
        _send(node.port, [child])
        _send(node.port, [urgent], priority=1)  # C-STORE Priority HIGH
        _send(node.port, [unknown], priority=2)  # LOW: no rule uses it by default
        child_study = _settled(registry, child.StudyInstanceUID)
        urgent_study = _settled(registry, urgent.StudyInstanceUID)
        unknown_study = _settled(registry, unknown.StudyInstanceUID)
    assert (child_study.state, child_study.reason) == ("SKIPPED", PEDIATRIC_REASON)
    assert child_study.routing["rule"] == "under-18" and child_study.id not in queued
    assert (urgent_study.state, urgent_study.priority) == ("QUEUED", "HIGH")
    assert urgent_study.routing["rule"] == "store-priority-high" and "priority HIGH" in urgent_study.reason
    assert (unknown_study.state, unknown_study.priority) == ("QUEUED", "ROUTINE")
    assert unknown_study.routing["notes"] == [AGE_UNKNOWN_NOTE]
    with registry.session() as session:
        stored = dict(session.execute(select(Instance.sop_instance_uid, Instance.attributes)).all())
    assert stored[urgent.SOPInstanceUID]["store_priority"] == "HIGH"
    assert stored[unknown.SOPInstanceUID]["store_priority"] == "LOW"
    assert stored[child.SOPInstanceUID]["store_priority"] == "MEDIUM"
    assert "PatientBirthDate" not in str(stored) and "patient_birth" not in str(stored)


def test_trusted_router_completes_on_release_and_a_late_instance_reopens(
    settings: Settings, registry: Registry
) -> None:
    settings = settings.model_copy(update={"stable_after": 3600.0, "trusted_routers": ["ROUTER"]})
    queued: list[int] = []
    study_uid = make_cxr().StudyInstanceUID
    frontal = make_cxr(study_uid=study_uid)
    lateral = make_cxr(study_uid=study_uid, view_position="LL")
    other = make_cxr()
    with running_node(settings, registry, enqueue=queued.append, assembler_interval=0.1) as node:
        _send(node.port, [frontal, lateral], calling="ROUTER")
        study = _settled(registry, study_uid)
        assert study.state == "QUEUED" and "trusted router released" in " ".join(
            e for e in _reasons(registry, study.id)
        )
        assert queued == [study.id]

        _send(node.port, [other], calling="MODALITY")  # not trusted: waits for the (hour-long) quiet window
        time.sleep(1.0)
        assert _study(registry, other.StudyInstanceUID).state == "RECEIVING"

        child_uid = make_cxr().StudyInstanceUID
        child = make_cxr(study_uid=child_uid, view_position="LL")  # lateral only: skipped by the image choice
        _send(node.port, [child], calling="ROUTER")
        assert _settled(registry, child_uid).state == "SKIPPED"
        late = make_cxr(study_uid=child_uid)  # a frontal arrives late from another sender: re-opened
        _send(node.port, [late], calling="MODALITY")
        assert wait_for(lambda: _study(registry, child_uid).state == "RECEIVING", timeout=10, what="re-opened")


def _reasons(registry: Registry, study_id: int) -> list[str]:
    from radialog.registry import StudyEvent

    with registry.session() as session:
        return [r or "" for r in session.scalars(select(StudyEvent.reason).where(StudyEvent.study_id == study_id))]
