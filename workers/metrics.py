"""Prometheus metrics of the pipeline: stage latencies, failures, batch sizes, queue depths.

The worker serves them with ``start_metrics_server(port)``; the API imports ``register_queue_depth``
and the default registry for its own /metrics. Queue depth is read from the broker at scrape time
(kombu's passive queue_declare, which counts every priority sub-queue on Redis).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from radialog.logging import get_logger
from radialog.settings import Settings

log = get_logger(__name__)

STAGE_SECONDS = Histogram(
    "radialog_job_stage_seconds",
    "Seconds per report-job stage (preprocess, classifier, vision, generate, store, ...).",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
JOB_SECONDS = Histogram(
    "radialog_job_seconds",
    "Seconds from a job being queued to its report being stored, per study priority (HIGH, ROUTINE, LOW).",
    ["priority"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
FAILURES = Counter(
    "radialog_job_failures",
    "Report jobs that failed (kind: unusable_image, model_error, store_error, gave_up, crashed, transient).",
    ["kind"],
)
BATCH_SIZE = Histogram("radialog_batch_size", "Studies per model batch.", buckets=(1, 2, 4, 8, 16, 32, 64))
DIALOG_SECONDS = Histogram(
    "radialog_dialog_turn_seconds",
    "Seconds per dialog turn (first: to the first token; total: to the stored answer).",
    ["phase"],
    buckets=(0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class QueueDepthCollector(Collector):
    """``radialog_queue_depth{queue}``: messages waiting in each broker queue, read on scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from radialog.messaging import BrokerUnavailable, queue_depths

        family = GaugeMetricFamily("radialog_queue_depth", "Messages waiting per queue.", labels=["queue"])
        try:
            depths = queue_depths(self.settings)
        except BrokerUnavailable:  # no depth this scrape, the scrape still works
            log.warning("queue depth unavailable: broker unreachable")
            return
        for queue, count in depths.items():
            family.add_metric([queue], float(count))
        yield family


class EngineCollector(Collector):
    """The serving engine's state, read on scrape: sequences decoding and waiting per kind, KV slots,
    decode steps run. ``engine`` is a ``workers.engine.Engine`` (not imported here: no torch needed)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sequences = GaugeMetricFamily(
            "radialog_engine_sequences", "Requests in the engine by kind and state.", labels=["kind", "state"]
        )
        slots = GaugeMetricFamily("radialog_engine_slots", "KV-cache slots per pool.", labels=["kind"])
        for kind, pool in self.engine.pools.items():
            sequences.add_metric([kind, "decoding"], float(len(self.engine.live[kind])))
            sequences.add_metric([kind, "waiting"], float(len(self.engine.waiting[kind])))
            slots.add_metric([kind], float(pool.slots))
        yield sequences
        yield slots
        yield CounterMetricFamily(
            "radialog_engine_decode_steps", "Decode steps the engine has run.", value=float(self.engine.step_count)
        )


def register_engine(engine: Any, registry: CollectorRegistry = REGISTRY) -> None:
    """Add the engine's collector to ``registry`` (the worker does it once, after loading the model)."""
    registry.register(EngineCollector(engine))


_registered: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()


def register_queue_depth(settings: Settings, registry: CollectorRegistry = REGISTRY) -> None:
    """Add the queue-depth collector to ``registry`` once."""
    if registry in _registered:
        return
    registry.register(QueueDepthCollector(settings))
    _registered.add(registry)


def start_metrics_server(settings: Settings, port: int, addr: str = "0.0.0.0") -> Any:
    """Serve /metrics on ``port`` from a daemon thread (the worker's own metrics + queue depths);
    returns the HTTP server (``.shutdown()`` stops it)."""
    register_queue_depth(settings)
    server, _thread = start_http_server(port, addr=addr)
    log.info("metrics served", extra={"port": server.server_address[1]})
    return server
