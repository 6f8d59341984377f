"""Prometheus metrics: request counts and latencies per route template, and studies per state
(read from the registry at scrape time, so every API replica reports the same truth)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radialog.registry import Registry, Study, StudyState
from radialog.settings import Settings

if TYPE_CHECKING:
    from api.services import Services


class StudyStateCollector:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily("radialog_studies", "Studies in the registry by state", labels=["state"])
        counts = {s.value: 0 for s in StudyState}
        try:
            with self.registry.session() as session:
                for state, count in session.execute(select(Study.state, func.count()).group_by(Study.state)):
                    counts[state] = count
        except SQLAlchemyError:  # a scrape must not fail because the database is down; /readyz says so
            return
        for state, count in counts.items():
            gauge.add_metric([state], count)
        yield gauge


class Metrics:
    def __init__(self, registry: Registry, settings: Settings | None = None, services: Services | None = None) -> None:
        self.collectors = CollectorRegistry()
        self.requests = Counter(
            "radialog_api_requests", "API requests", ["method", "route", "status"], registry=self.collectors
        )
        self.latency = Histogram(
            "radialog_api_request_seconds",
            "API request time to the first response byte",
            ["method", "route"],
            registry=self.collectors,
        )
        self.collectors.register(StudyStateCollector(registry))
        from api.ops_metrics import DiskCollector, RegistryCollector, WorkersCollector  # for deploy/grafana

        self.collectors.register(RegistryCollector(registry))
        if services is not None:
            self.collectors.register(WorkersCollector(services))
        if settings is not None:
            self.collectors.register(DiskCollector(settings))


class MetricsMiddleware:
    """Counts every HTTP request by its route template (never the concrete path: ids are not labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                route = scope.get("route")
                template = getattr(route, "path", "unmatched")
                self.metrics.latency.labels(scope["method"], template).observe(time.perf_counter() - start)
                self.metrics.requests.labels(scope["method"], template, str(status["code"])).inc()
            await send(message)

        await self.app(scope, receive, send_wrapper)
