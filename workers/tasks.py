"""The Celery tasks, registered by name with every app (``shared_task``); bodies live in their modules.

"radialog.report" [job_id]      -> ``pipeline.run_report_job`` (a batch around the job)
"radialog.dialog_turn" [turn_id] -> ``dialog.run_dialog_turn``
"radialog.export" [export_id]    -> ``reporting.export.deliver`` (the outbox keeps attempts and backoff)
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from radialog.logging import get_logger
from radialog.messaging import DIALOG_TASK, EXPORT_TASK, REPORT_TASK
from workers import context
from workers.pipeline import TransientError

log = get_logger(__name__)

#: Seconds before the n-th retry of a transient failure (capped exponential).
RETRY_BACKOFF = (5, 15, 45, 120, 300)


@shared_task(name=REPORT_TASK, bind=True, max_retries=len(RETRY_BACKOFF))
def report(self: Any, job_id: int) -> str:
    """Run a batch of report jobs that starts with ``job_id``."""
    from workers.pipeline import run_report_job

    try:
        return run_report_job(context.current(), job_id)
    except TransientError as exc:
        countdown = RETRY_BACKOFF[min(self.request.retries, len(RETRY_BACKOFF) - 1)]
        log.warning("transient failure, retrying", extra={"job": job_id, "countdown": countdown})
        raise self.retry(exc=exc, countdown=countdown) from exc


@shared_task(name=DIALOG_TASK)
def dialog_turn(turn_id: int) -> str:
    """Answer one dialog turn, streaming its tokens."""
    from workers.dialog import run_dialog_turn

    return run_dialog_turn(context.current(), turn_id)


@shared_task(name=EXPORT_TASK)
def export(export_id: int) -> str:
    """Send one outbox row; failures stay in the outbox and the sweep sends it again when due."""
    from reporting.export import deliver

    ctx = context.current()
    return deliver(ctx.registry, ctx.settings, export_id)
