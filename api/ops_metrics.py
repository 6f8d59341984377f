"""Prometheus collectors read at scrape time for the Grafana board and the alert rules (deploy/).

From the registry: instances received (the ingest rate), outbox rows by state and the age of the oldest
PENDING one (the export backlog), drafts approved and approved unchanged. From Redis: workers whose
model is loaded and their engines' slots. From the file system: free space where the spool is, and the
floor below which the node refuses images. Every API replica reports the same values (the board takes
``max``); a source that does not answer leaves its metrics out of that scrape (the rules see them absent).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from api.services import Services
from radialog.registry import ApprovalReview, Export, ExportState, Instance, Registry, utcnow
from radialog.settings import Settings


class RegistryCollector:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        try:
            with self.registry.session() as session:
                instances = session.scalar(select(func.count()).select_from(Instance)) or 0
                by_state = dict(session.execute(select(Export.state, func.count()).group_by(Export.state)).all())
                oldest = session.scalar(
                    select(func.min(Export.created_at)).where(Export.state == ExportState.PENDING.value)
                )
                approved = session.scalar(select(func.count()).select_from(ApprovalReview)) or 0
                unchanged = (
                    session.scalar(
                        select(func.count()).select_from(ApprovalReview).where(ApprovalReview.edit_distance == 0)
                    )
                    or 0
                )
        except SQLAlchemyError:  # the database is down: /readyz says so; the scrape still answers
            return
        yield CounterMetricFamily(
            "radialog_instances_received", "DICOM instances stored by the node (registry rows).", value=float(instances)
        )
        exports = GaugeMetricFamily("radialog_exports", "SR outbox rows by state.", labels=["state"])
        for state in ExportState:
            exports.add_metric([state.value], float(by_state.get(state.value, 0)))
        yield exports
        age = 0.0
        if oldest is not None:
            age = max(0.0, (utcnow() - oldest).total_seconds())
        yield GaugeMetricFamily(
            "radialog_export_oldest_pending_seconds",
            "Age of the oldest SR still waiting to be accepted by a destination (0: none).",
            value=age,
        )
        yield CounterMetricFamily(
            "radialog_drafts_approved", "AI drafts approved (each approval).", value=float(approved)
        )
        yield CounterMetricFamily(
            "radialog_drafts_approved_unchanged",
            "Approvals whose signed text equals the AI draft (edit distance 0).",
            value=float(unchanged),
        )


class WorkersCollector:
    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        from radialog.presence import BrokerUnavailable

        try:
            ready = self.services.ready_workers()
        except (BrokerUnavailable, redis.RedisError):  # the broker is down: unknown, not zero
            return
        yield GaugeMetricFamily(
            "radialog_workers_ready", "Workers with their model loaded (readiness keys).", value=float(len(ready))
        )
        slots = GaugeMetricFamily(
            "radialog_worker_engine_slots", "KV-cache slots of each ready worker's engine.", labels=["worker", "kind"]
        )
        for info in ready:
            engine = found if isinstance(found := info.get("engine"), dict) else {}
            for kind, pool in engine.items():
                if isinstance(pool, dict) and isinstance(pool.get("slots"), int):
                    slots.add_metric([str(info.get("worker")), kind], float(pool["slots"]))
        yield slots


class DiskCollector:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        try:
            usage = shutil.disk_usage(self.settings.data_dir)
        except OSError:  # no data directory on this host: nothing to say about it
            return
        yield GaugeMetricFamily(
            "radialog_disk_free_bytes", "Free bytes on the file system of the data directory.", value=float(usage.free)
        )
        yield GaugeMetricFamily(
            "radialog_disk_size_bytes", "Size of the file system of the data directory.", value=float(usage.total)
        )
        yield GaugeMetricFamily(
            "radialog_disk_min_free_bytes",
            "RADIALOG_MIN_FREE_BYTES: below this the node answers C-STORE with 0xA700.",
            value=float(self.settings.min_free_bytes),
        )
