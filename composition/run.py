"""``radialog run``: node, worker, exporter and API in one process on one machine (embedded defaults).

The node and the API run in threads, the worker (which is also the exporter: it consumes every queue and
sweeps the outbox) in the main thread. Each part is imported and started unguarded: a part that cannot be
imported or started (a broken pynetdicom, a port in use, settings it refuses) stops the parts already
running and ends the command non-zero, the log and stderr naming the part and why (``PartFailed``),
never a half-running chain that says "no DICOM listener" in a log.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
        update={
            "broker_url": f"sqla+sqlite:///{base / 'broker.sqlite'}",
            "result_backend": f"db+sqlite:///{base / 'results.sqlite'}",
        }
    )


class PartFailed(RuntimeError):
    """A part of ``radialog run`` could not start (or, for the worker, which runs until the command ends,
    stopped with an error); the parts already running were stopped. ``part`` names it, ``why`` says why
    without exception messages (they may quote data; see ``radialog.logging``); the error itself is chained."""

    def __init__(self, part: str, why: str, failed: str = "could not start", where: str = "") -> None:
        super().__init__(f"radialog run: the {part}{f' ({where})' if where else ''} {failed}: {why}")
        self.part, self.why = part, why


def why_it_failed(exc: BaseException) -> str:
    """The error chain as types, with what is safe to say of each: an ``OSError``'s errno (the port in use),
    the module an ``ImportError`` could not import; outermost first."""
    said: list[str] = []
    link: BaseException | None = exc
    while link is not None and len(said) < 5:
        if isinstance(link, OSError) and link.errno is not None:
            said.append(
                f"{type(link).__name__} {errno.errorcode.get(link.errno, link.errno)} ({os.strerror(link.errno)})"
            )
        elif isinstance(link, ImportError) and link.name:
            said.append(f"{type(link).__name__} (module {link.name})")
        else:
            said.append(type(link).__name__)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return ", caused by ".join(said)


@contextmanager
def part(
    name: str,
    failed: str = "could not start",
    host: str | None = None,
    port: int | None = None,
) -> Iterator[None]:
    """Start (or run) part ``name`` in the block; an error becomes ``PartFailed``, logged with the part and why."""
    try:
        yield
    except Exception as exc:
        why = why_it_failed(exc)
        where = f"{host}:{port}" if host is not None else ""
        log.error(
            "a part of radialog run failed; stopping the others and exiting",
            extra={"part": name, "failed": failed, "why": why, "host": host, "port": port},
            exc_info=exc,
        )
        raise PartFailed(name, why, failed, where) from exc


def run_all(
    settings: Settings,
    *,
    with_api: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
    metrics_port: int | None = None,
    sweep_interval_s: float = 10.0,
) -> None:
    """Start the node and the API in threads, then the worker in this thread (it consumes every queue).
    ``PartFailed`` when one cannot start, after the others were stopped."""
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
    with part("registry"):
        registry = Registry.from_settings(settings)
    stoppers: list[tuple[str, Callable[[], Any]]] = []
    try:
        with part("DICOM listener", host=settings.dicom_host, port=settings.dicom_port):
            node = start_node(settings, registry, lambda study_id: enqueue_report(registry, settings, study_id))
        stoppers.append(("DICOM listener", node.stop))
        log.info("node started", extra={"port": node.port})
        if with_api:
            with part("API", host=settings.api_host, port=settings.api_port):
                # the node and the exporter in this process watch their sockets with select(): none may pass 1,023
                stoppers.append(("API", serve_in_thread(create_app(settings), settings, fd_ceiling=SELECT_FD_LIMIT)))
            log.info("api started", extra={"port": settings.api_port})
        with part("worker", failed="failed (starting or serving)"):
            run_worker(
                settings,
                queues=list(QUEUES),
                lease_s=lease_s,
                sweep_interval_s=sweep_interval_s,
                metrics_port=metrics_port,
            )
    finally:
        for name, stop in reversed(stoppers):
            stop()
            log.info("part stopped", extra={"part": name})
        registry.dispose()


@click.command()
@click.option("--api/--no-api", "with_api", default=True, show_default=True, help="Serve the API too.")
@click.option("--dicom-port", type=int, default=None, help="DICOM port (default: settings.dicom_port).")
@click.option("--api-port", type=int, default=None, help="API port (default: settings.api_port).")
@common_options
def run(
    with_api: bool,
    dicom_port: int | None,
    api_port: int | None,
    device: str | None,
    batch_size: int | None,
    batch_wait_ms: int | None,
    lease_seconds: float,
    metrics_port: int | None,
) -> None:
    """Node, worker, exporter and API in one process on one machine (embedded defaults)."""
    settings = overridden_settings(
        {
            "device": device,
            "batch_size": batch_size,
            "batch_wait_ms": batch_wait_ms,
            "dicom_port": dicom_port,
            "api_port": api_port,
        }
    )
    try:
        run_all(settings, with_api=with_api, lease_s=lease_seconds, metrics_port=metrics_port)
    except PartFailed as exc:
        raise click.ClickException(str(exc)) from exc  # "Error: ..." on stderr, exit status 1
