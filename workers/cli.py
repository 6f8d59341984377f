"""``radialog worker`` (one per GPU) and ``radialog run`` (everything on one machine).

A worker is one process: it loads the model once before it consumes anything, announces itself ready
(Redis key ``radialog:worker:<hostname>``), and serves the queues in the order given (dialog first). With
the engine (the default), ``RADIALOG_REPORT_TASKS`` Celery threads feed it report batches and dialog turns
come through their own consumer (``workers.dialog_consumer``), so a turn never waits for a pool thread;
without it, Celery's solo pool runs one task at a time. Start one per GPU with ``CUDA_VISIBLE_DEVICES=N radialog worker`` or
``--device cuda:N``. An export-only worker (``--queues export``) loads no model.
"""

from __future__ import annotations

from typing import Any

import click
import redis

from radialog.logging import get_logger
from radialog.settings import Settings, get_settings
from workers.context import DEFAULT_LEASE_S, default_hostname, is_redis_url

log = get_logger(__name__)

MODEL_QUEUES = frozenset({"dialog", "report"})


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    if not is_redis_url(url):
        return False
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def embedded_broker(settings: Settings) -> Settings:
    """Settings that use kombu's SQLite transport and an SQLite result backend under data_dir."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    base = settings.data_dir.resolve()
    return settings.model_copy(
        update={"broker_url": f"sqla+sqlite:///{base / 'broker.sqlite'}",
                "result_backend": f"db+sqlite:///{base / 'results.sqlite'}"}
    )


def run_worker(
    settings: Settings,
    *,
    queues: list[str],
    hostname: str | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    sweep: bool = True,
    sweep_interval_s: float = 10.0,
    metrics_port: int | None = None,
    loglevel: str = "INFO",
) -> None:
    """Load the model (when a queue needs it), then consume ``queues`` in that order until stopped."""
    from workers import context
    from workers.celery_app import app_for
    from workers.reconciler import Sweeper

    hostname = hostname or default_hostname(settings.device)
    ctx = context.load(settings, hostname=hostname, with_model=bool(MODEL_QUEUES & set(queues)), lease_s=lease_s)
    sweeper = Sweeper(ctx.registry, settings, interval_s=sweep_interval_s, lease_s=lease_s).start() if sweep else None
    engine = getattr(ctx.backend, "engine", None)  # the serving engine of an EngineBackend, else None
    if metrics_port is not None:
        from workers.metrics import start_metrics_server

        start_metrics_server(settings, metrics_port)
        if engine is not None:
            from workers.metrics import register_engine

            register_engine(engine)
    app = app_for(settings)
    import workers.tasks  # noqa: F401  (registers the tasks with this app)

    pool, concurrency, consumed = "solo", 1, list(queues)
    if engine is not None:
        # Report tasks wait on the engine in pool threads; dialog turns come through their own consumer.
        pool, concurrency = "threads", settings.report_tasks
        others = [q for q in queues if q != "dialog"]
        if "dialog" in queues and others:
            from workers.dialog_consumer import DialogConsumer

            DialogConsumer.threads = settings.engine_dialog_slots
            app.steps["consumer"].add(DialogConsumer)
            consumed = others
    log.info("worker starting", extra={"worker": hostname, "queues": queues, "batch_size": settings.batch_size,
                                       "pool": pool, "concurrency": concurrency})
    try:
        app.worker_main([
            "worker", "--pool", pool, "--concurrency", str(concurrency), "--queues", ",".join(consumed),
            "--hostname", hostname, "--loglevel", loglevel, "--without-gossip", "--without-mingle",
            "--without-heartbeat",
        ])
    finally:
        if sweeper is not None:
            sweeper.stop()
        ctx.stop()


def _settings(overrides: dict[str, Any]) -> Settings:
    settings = get_settings()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=overrides) if overrides else settings


_common = [
    click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: settings.device)."),
    click.option("--batch-size", type=int, default=None, help="Most report jobs per batch."),
    click.option("--batch-wait-ms", type=int, default=None, help="How long to wait to fill a batch."),
    click.option("--lease-seconds", type=float, default=DEFAULT_LEASE_S, show_default=True,
                 help="A running job whose worker is silent this long is re-queued."),
    click.option("--metrics-port", type=int, default=None, help="Serve Prometheus /metrics on this port."),
]


def common_options(func: Any) -> Any:
    for option in reversed(_common):
        func = option(func)
    return func


@click.command()
@click.option("--queues", "-Q", default="dialog,export,report", show_default=True,
              help="Queues in the order served; 'export' alone loads no model.")
@click.option("--hostname", "-n", default=None, help="Worker name (default radialog-<device>-<pid>@<host>).")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Run the reconciler and the export sweep in this worker (one sweeper per interval).")
@common_options
def worker(queues: str, hostname: str | None, sweep: bool, device: str | None, batch_size: int | None,
           batch_wait_ms: int | None, lease_seconds: float, metrics_port: int | None) -> None:
    """Run a worker: one per GPU, the model loaded once, micro-batched report jobs and dialog turns."""
    settings = _settings({"device": device, "batch_size": batch_size, "batch_wait_ms": batch_wait_ms})
    run_worker(settings, queues=[q.strip() for q in queues.split(",") if q.strip()], hostname=hostname,
               lease_s=lease_seconds, sweep=sweep, metrics_port=metrics_port)


@click.command()
@click.option("--api/--no-api", "with_api", default=True, show_default=True, help="Serve the API too.")
@click.option("--dicom-port", type=int, default=None, help="DICOM port (default: settings.dicom_port).")
@click.option("--api-port", type=int, default=None, help="API port (default: settings.api_port).")
@common_options
def run(with_api: bool, dicom_port: int | None, api_port: int | None, device: str | None,
        batch_size: int | None, batch_wait_ms: int | None, lease_seconds: float, metrics_port: int | None) -> None:
    """Node, worker, exporter and API in one process on one machine (embedded defaults)."""
    settings = _settings({"device": device, "batch_size": batch_size, "batch_wait_ms": batch_wait_ms,
                          "dicom_port": dicom_port, "api_port": api_port})
    run_all(settings, with_api=with_api, lease_s=lease_seconds, metrics_port=metrics_port)


def run_all(settings: Settings, *, with_api: bool = True, lease_s: float = DEFAULT_LEASE_S,
            metrics_port: int | None = None, sweep_interval_s: float = 10.0) -> None:
    """Start the node and the API in threads, then the worker in this thread (it consumes every queue)."""
    from radialog.registry import Registry

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
    stoppers: list[Any] = []
    try:
        from dicom_node.server import start_node
        from workers.pipeline import enqueue_report

        node = start_node(settings, registry, lambda study_id: enqueue_report(registry, settings, study_id))
        stoppers.append(node.stop)
        log.info("node started", extra={"port": node.port})
    except ImportError:
        log.warning("dicom_node is not installed: no DICOM listener")
    if with_api:
        stoppers.append(_start_api(settings))
    try:
        run_worker(settings, queues=["dialog", "export", "report"], lease_s=lease_s,
                   sweep_interval_s=sweep_interval_s, metrics_port=metrics_port)
    finally:
        for stop in reversed(stoppers):
            stop()
        registry.dispose()


def _start_api(settings: Settings) -> Any:
    try:
        from api.app import create_app
        from api.server import SELECT_FD_LIMIT, serve_in_thread
    except ImportError:
        log.warning("api is not installed: no reporting API")
        return lambda: None
    # the node and the exporter in this process watch their sockets with select(): none may pass 1,023
    stop = serve_in_thread(create_app(settings), settings, fd_ceiling=SELECT_FD_LIMIT)
    log.info("api started", extra={"port": settings.api_port})
    return stop
