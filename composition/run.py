"""``radialog run``: node, worker, exporter and API in one process on one machine (embedded defaults).

The node and the API run in threads, the worker in the main thread (it consumes every queue). Each part is
imported and started unguarded: a part that cannot be imported or started (a broken pynetdicom, a port in
use) ends the command with its error, never a half-running chain that says "no DICOM listener" in a log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from api.app import create_app
from api.server import SELECT_FD_LIMIT, serve_in_thread
from dicom_node.server import start_node
from radialog.logging import get_logger
from radialog.messaging import QUEUES, enqueue_report, redis_answers
from radialog.registry import Registry
from radialog.settings import Settings
from workers.cli import common_options, overridden_settings, run_worker
from workers.context import DEFAULT_LEASE_S

log = get_logger(__name__)


def embedded_broker(settings: Settings) -> Settings:
    """Settings that use kombu's SQLite transport and an SQLite result backend under data_dir."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    base = settings.data_dir.resolve()
    return settings.model_copy(
        update={"broker_url": f"sqla+sqlite:///{base / 'broker.sqlite'}",
                "result_backend": f"db+sqlite:///{base / 'results.sqlite'}"}
    )


def run_all(settings: Settings, *, with_api: bool = True, lease_s: float = DEFAULT_LEASE_S,
            metrics_port: int | None = None, sweep_interval_s: float = 10.0) -> None:
    """Start the node and the API in threads, then the worker in this thread (it consumes every queue)."""
    if redis_answers(settings.broker_url):
        log.info("broker: Redis", extra={"broker": settings.broker_url.split("@")[-1]})
    else:
        settings = embedded_broker(settings)
        log.warning(
            "Redis is not answering: using the embedded SQLite broker. Durability of waiting and running "
            "jobs comes from the registry and the reconciler, not from the broker; dialog answers are not "
            "streamed (they are stored and read back).",
            extra={"broker": settings.broker_url},
        )
    registry = Registry.from_settings(settings)
    stoppers: list[Callable[[], Any]] = []
    try:
        node = start_node(settings, registry, lambda study_id: enqueue_report(registry, settings, study_id))
        stoppers.append(node.stop)
        log.info("node started", extra={"port": node.port})
        if with_api:
            # the node and the exporter in this process watch their sockets with select(): none may pass 1,023
            stoppers.append(serve_in_thread(create_app(settings), settings, fd_ceiling=SELECT_FD_LIMIT))
            log.info("api started", extra={"port": settings.api_port})
        run_worker(settings, queues=list(QUEUES), lease_s=lease_s, sweep_interval_s=sweep_interval_s,
                   metrics_port=metrics_port)
    finally:
        for stop in reversed(stoppers):
            stop()
        registry.dispose()


@click.command()
@click.option("--api/--no-api", "with_api", default=True, show_default=True, help="Serve the API too.")
@click.option("--dicom-port", type=int, default=None, help="DICOM port (default: settings.dicom_port).")
@click.option("--api-port", type=int, default=None, help="API port (default: settings.api_port).")
@common_options
def run(with_api: bool, dicom_port: int | None, api_port: int | None, device: str | None,
        batch_size: int | None, batch_wait_ms: int | None, lease_seconds: float, metrics_port: int | None) -> None:
    """Node, worker, exporter and API in one process on one machine (embedded defaults)."""
    settings = overridden_settings({"device": device, "batch_size": batch_size, "batch_wait_ms": batch_wait_ms,
                          "dicom_port": dicom_port, "api_port": api_port})
    run_all(settings, with_api=with_api, lease_s=lease_seconds, metrics_port=metrics_port)
