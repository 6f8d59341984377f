"""``radialog worker`` (one per GPU); ``radialog run`` (everything in one process) is ``composition.run``.

A worker is one process: it loads the model once before it consumes anything, announces itself ready
(Redis key ``radialog:worker:<hostname>``), and serves the queues in the order given (dialog first). With
the engine (the default), ``RADIALOG_REPORT_TASKS`` Celery threads feed it report batches and dialog turns
come through their own consumer (``workers.dialog_consumer``), so a turn never waits for a pool thread;
without it, Celery's solo pool runs one task at a time. Start one per GPU with
``CUDA_VISIBLE_DEVICES=N radialog worker`` or ``--device cuda:N``. An export-only worker (``--queues export``)
loads no model.
"""

from __future__ import annotations

from typing import Any

import click

from radialog.logging import get_logger
from radialog.messaging import DIALOG_QUEUE, QUEUES, REPORT_QUEUE, app_for
from radialog.settings import Settings, get_settings
from workers.context import DEFAULT_LEASE_S, default_hostname

log = get_logger(__name__)

MODEL_QUEUES = frozenset({DIALOG_QUEUE, REPORT_QUEUE})


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
        others = [q for q in queues if q != DIALOG_QUEUE]
        if DIALOG_QUEUE in queues and others:
            from workers.dialog_consumer import DialogConsumer

            DialogConsumer.threads = settings.engine_dialog_slots
            app.steps["consumer"].add(DialogConsumer)
            consumed = others
    log.info(
        "worker starting",
        extra={
            "worker": hostname,
            "queues": queues,
            "batch_size": settings.batch_size,
            "pool": pool,
            "concurrency": concurrency,
        },
    )
    try:
        app.worker_main(
            [
                "worker",
                "--pool",
                pool,
                "--concurrency",
                str(concurrency),
                "--queues",
                ",".join(consumed),
                "--hostname",
                hostname,
                "--loglevel",
                loglevel,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        if sweeper is not None:
            sweeper.stop()
        ctx.stop()


def overridden_settings(overrides: dict[str, Any]) -> Settings:
    settings = get_settings()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=overrides) if overrides else settings


_common = [
    click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: settings.device)."),
    click.option("--batch-size", type=int, default=None, help="Most report jobs per batch."),
    click.option("--batch-wait-ms", type=int, default=None, help="How long to wait to fill a batch."),
    click.option(
        "--lease-seconds",
        type=float,
        default=DEFAULT_LEASE_S,
        show_default=True,
        help="A running job whose worker is silent this long is re-queued.",
    ),
    click.option("--metrics-port", type=int, default=None, help="Serve Prometheus /metrics on this port."),
]


def common_options(func: Any) -> Any:
    for option in reversed(_common):
        func = option(func)
    return func


@click.command()
@click.option(
    "--queues",
    "-Q",
    default=",".join(QUEUES),
    show_default=True,
    help="Queues in the order served; 'export' alone loads no model.",
)
@click.option("--hostname", "-n", default=None, help="Worker name (default radialog-<device>-<pid>@<host>).")
@click.option(
    "--sweep/--no-sweep",
    default=True,
    show_default=True,
    help="Run the reconciler and the export sweep in this worker (one sweeper per interval).",
)
@common_options
def worker(
    queues: str,
    hostname: str | None,
    sweep: bool,
    device: str | None,
    batch_size: int | None,
    batch_wait_ms: int | None,
    lease_seconds: float,
    metrics_port: int | None,
) -> None:
    """Run a worker: one per GPU, the model loaded once, micro-batched report jobs and dialog turns."""
    settings = overridden_settings({"device": device, "batch_size": batch_size, "batch_wait_ms": batch_wait_ms})
    run_worker(
        settings,
        queues=[q.strip() for q in queues.split(",") if q.strip()],
        hostname=hostname,
        lease_s=lease_seconds,
        sweep=sweep,
        metrics_port=metrics_port,
    )
