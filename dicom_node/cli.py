"""``radialog node``: the DICOM SCP and the study assembler, until SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading
from functools import partial
from typing import Any

import click

from radialog.logging import get_logger
from radialog.messaging import enqueue_report

log = get_logger(__name__)


@click.command("node")
@click.option("--host", default=None, help="Listen address (default: settings.dicom_host).")
@click.option("--port", type=int, default=None, help="DICOM port; 0 = any free port (logged).")
@click.option("--ae-title", default=None, help="Our AE title (default: settings.ae_title).")
@click.option("--no-enqueue", is_flag=True, help="Do not send Celery tasks; only mark studies QUEUED.")
def node(host: str | None, port: int | None, ae_title: str | None, no_enqueue: bool) -> None:
    """Receive chest X-rays (C-STORE), assemble studies and queue report jobs."""
    from dicom_node.server import start_node
    from radialog.registry import Registry
    from radialog.settings import get_settings

    overrides = {
        k: v for k, v in {"dicom_host": host, "dicom_port": port, "ae_title": ae_title}.items() if v is not None
    }
    settings = get_settings()
    if overrides:
        settings = settings.model_copy(update=overrides)
    registry = Registry.from_settings(settings)
    enqueue = None if no_enqueue else partial(enqueue_report, registry, settings)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("node stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    running = start_node(settings, registry, enqueue)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        running.stop()
        registry.dispose()
        log.info("node stopped")
