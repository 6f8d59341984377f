"""STAT first, end to end (issue 19): a running node (the routing rules, the C-STORE Priority field), a real
``radialog worker`` process with the tiny model on CPU, the real Redis. 50 routine studies flood the queue,
then one study arrives with C-STORE priority HIGH: it is reported before every routine study that had not
started when it arrived (one report batch at a time, so "started" and "reported" are ordered)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import select

from radialog.messaging import enqueue_report
from radialog.registry import Job, Registry, Report, Study
from radialog.settings import Settings
from radialog.synthetic import make_cxr
from tests.support.brokers import redis_url
from tests.support.dicom_peers import store_all
from tests.support.node import running_node
from tests.test_node_routing import _send
from tests.test_pipeline import Harness

ROUTINE_STUDIES = 50


@pytest.mark.slow
def test_a_stat_study_is_reported_before_routine_ones_that_had_not_started(
    tmp_path: Path, settings: Settings, sqlite_registry: Registry, tiny_model: tuple[Path, Path]
) -> None:
    settings = settings.model_copy(update={"stable_after": 0.3, "batch_size": 4, "batch_wait_ms": 50})
    h = Harness(tmp_path, sqlite_registry, settings, tiny_model, redis_url=redis_url(__name__))
    try:
        enqueue = partial(enqueue_report, sqlite_registry, h.settings)
        with running_node(h.settings, sqlite_registry, enqueue=enqueue, assembler_interval=0.1) as node:
            routine = [make_cxr(rows=128, cols=128, seed=i, patient_index=i) for i in range(ROUTINE_STUDIES)]
            assert set(store_all(node.port, routine, calling="MODALITY")) == {0}
            h.wait_for(lambda: _count(sqlite_registry, "QUEUED") == ROUTINE_STUDIES, "routine studies queued")
            h.start_worker("w-stat", env_overrides={"report_tasks": 1})
            h.wait_for(lambda: _count(sqlite_registry, "REPORTED") >= 2, "the first routine reports")

            stat = make_cxr(rows=128, cols=128, seed=999, patient_index=999)
            _send(node.port, [stat], calling="ED_MODALITY", priority=1)  # C-STORE Priority HIGH
            h.wait_for(lambda: _count(sqlite_registry, "REPORTED") == ROUTINE_STUDIES + 1, "every study reported")

        with sqlite_registry.session() as session:
            rows = session.execute(
                select(Study.study_instance_uid, Study.priority, Job.queued_at, Job.started_at, Report.id)
                .join(Job, Job.study_id == Study.id)
                .join(Report, Report.study_id == Study.id)
            ).all()
        by_uid = {row.study_instance_uid: row for row in rows}
        urgent = by_uid[stat.StudyInstanceUID]
        assert urgent.priority == "HIGH"
        waiting = [
            row for uid, row in by_uid.items() if uid != stat.StudyInstanceUID and row.started_at >= urgent.queued_at
        ]
        assert len(waiting) >= 10, "too few routine studies were still waiting when the STAT one arrived"
        assert all(row.priority == "ROUTINE" for row in waiting)
        later = [row for row in waiting if row.id < urgent.id]
        assert not later, f"{len(later)} routine studies that had not started were reported before the STAT one"
    finally:
        h.close()


def _count(registry: Registry, state: str) -> int:
    with registry.session() as session:
        return len(list(session.scalars(select(Study.id).where(Study.state == state))))
