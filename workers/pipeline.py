"""A report job from the registry to a stored report: batch, run the model, store, export.

Jobs are created and sent by ``radialog.messaging.enqueue_report`` (the node, the API's re-run, the reconciler).

Outcomes (all written to the registry, the source of truth):
- done: the model's output went through ``reporting.versions.create_ai_draft`` (report + SR + outbox
  rows, study REPORTED), Job DONE with per-stage timings and the worker's name; export tasks are sent.
- failed: Job FAILED and study FAILED with a readable reason, retryable from the API (``radialog.messaging.rerun``).
  Unusable pixels fail the study rather than skip it: the node already skipped what the headers rule
  out, and a pixel problem (a missing codec, a truncated file) is an operational fault worth a re-run.
- transient (GPU out of memory at batch size 1, a registry hiccup): the jobs go back to QUEUED and are
  retried with backoff; after ``MAX_ATTEMPTS`` charged claims a job fails for good.
- the worker process dies (a crash, a kill): ``workers.crashes`` re-runs the jobs it held one by one, each
  alone in its process, and charges a crash only to a job that was alone (FAILED at ``MAX_CRASHES``).
Idempotent: a redelivered message finds its job DONE (or running elsewhere) and does nothing, and
``create_ai_draft`` returns the existing report for (study, model, version).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from radialog.imaging import UnusableImage, load_model_image
from radialog.logging import get_logger
from radialog.messaging import send_export_tasks, send_report_task
from radialog.registry import ExportState, Job, JobState, Registry, Study, StudyState, transition, utcnow
from radialog.routing import Priority
from radialog.settings import Settings
from workers import metrics
from workers.batching import Claim, collect_batch, requeue
from workers.crashes import ALONE, BATCH, mark_running

if TYPE_CHECKING:
    import numpy as np

    from workers.context import WorkerContext
    from workers.models.base import ModelBackend, ReportOutput, StudyInput

log = get_logger(__name__)

#: A job claimed this many times (transient errors, crashes alone) is failed for good; claims lost with a
#: worker that died while the job waited or ran with others are not counted (``Claim.charged``).
MAX_ATTEMPTS = 5
#: Entries of a job's timings that are counts, not seconds (kept in the job row, not in the stage metric).
COUNTS = frozenset({"batch_size", "admitted_together"})


class TransientError(RuntimeError):
    """Worth retrying later: the jobs were given back to the queue."""


class JobFailure(RuntimeError):
    """A job that cannot succeed as it is; the message is the reason shown to users."""


# -- run ------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    claim: Claim
    image: np.ndarray
    preprocess_s: float


def _image_path(registry: Registry, settings: Settings, study_id: int) -> Path:
    with registry.session() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise JobFailure("the study is no longer in the registry")
        instance = study.selected_instance
        if instance is None:
            raise JobFailure("no image was selected for this study")
        return settings.spool_dir / instance.path


def load_image(registry: Registry, settings: Settings, study_id: int) -> np.ndarray:
    """The selected instance as the model's 8-bit image; unusable pixels raise JobFailure."""
    path = _image_path(registry, settings, study_id)
    try:
        return load_model_image(path)
    except UnusableImage as exc:
        raise JobFailure(f"unusable image: {exc}") from exc
    except FileNotFoundError as exc:
        raise JobFailure("the selected image is missing from the spool") from exc
    except Exception as exc:  # any other decoding fault belongs to this study alone, never to its batch
        raise JobFailure(f"unusable image: it cannot be read ({type(exc).__name__})") from exc


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of GPU memory, by the exception's type (``torch.cuda.OutOfMemoryError``), whatever its message."""
    import torch  # a worker has it loaded with its model; not a module-level import for light importers

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def run_backend(
    backend: ModelBackend, inputs: list[StudyInput], on_oom: Callable[[int], None] | None = None
) -> dict[str, ReportOutput | Exception]:
    """``backend.report_each`` over ``inputs``; every error ends up with its own study.

    A backend that fails a whole batch (the simple path) has the batch split in halves until the error
    stays with one study. Out of GPU memory: ``on_oom(batch size)`` is told, and a single study that still
    does not fit raises ``TransientError`` (the jobs go back to the queue). Any other error at batch size 1
    belongs to that study (the result is the exception).
    """
    if not inputs:
        return {}
    try:
        outputs = backend.report_each(inputs)
    except Exception as exc:  # noqa: BLE001 - split until the error stays with one study (its result)
        if len(inputs) == 1:
            outputs = [exc]
        else:
            log.warning("batch failed, splitting", extra={"batch_size": len(inputs), "error": type(exc).__name__})
            if on_oom is not None and is_out_of_memory(exc):
                on_oom(len(inputs))
            half = len(inputs) // 2
            return {**run_backend(backend, inputs[:half], on_oom), **run_backend(backend, inputs[half:], on_oom)}
    from workers.models.base import RequestCancelled

    results: dict[str, ReportOutput | Exception] = {}
    for study, out in zip(inputs, outputs):
        if isinstance(out, RequestCancelled):  # the engine stopped under it (worker shutting down)
            raise TransientError("the model engine stopped before the report was finished") from out
        if isinstance(out, Exception) and is_out_of_memory(out):
            if len(inputs) > 1:  # once more alone: the engine's step that failed may have been a big one
                results.update(run_backend(backend, [study], on_oom))
                continue
            raise TransientError("out of GPU memory with a single study") from out
        if isinstance(out, Exception):
            log.warning("model failed on one study", extra={"job": study.key}, exc_info=out)
        results[study.key] = out
    return results


def fail_job(registry: Registry, claim: Claim, reason: str, kind: str, settings: Settings | None = None) -> None:
    """Job and study FAILED with ``reason`` (shown in the API); with ``settings``, the ``study.failed`` webhook
    rows are written in the same transaction."""
    with registry.session() as session:
        job = session.get(Job, claim.job_id)
        # Only while this claim still holds the job: a worker whose lease lapsed and was taken over (the
        # attempt counter moved on) must not fail a job another worker is running.
        if job is None or job.state != JobState.RUNNING.value or job.attempts != claim.attempt:
            return
        job.state = JobState.FAILED.value
        job.error = reason
        job.finished_at = utcnow()
        job.heartbeat_at = None
        failed = transition(session, claim.study_id, StudyState.FAILED, reason)
        if failed and settings is not None:
            from reporting.channels.outbox import study_failed

            rows = study_failed(session, settings, claim.study_id, reason, utcnow())
            session.flush()
            export_ids = [row.id for row in rows]
        else:
            export_ids = []
    if export_ids and settings is not None:
        send_export_tasks(settings, export_ids)
    metrics.FAILURES.labels(kind=kind).inc()
    log.warning("report job failed", extra={"job": claim.job_id, "study": claim.study_id, "kind": kind})


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    """Seconds from ``start`` to ``end`` (registry timestamps: aware UTC, ``UTCDateTime``)."""
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def clean_output(output: ReportOutput) -> ReportOutput:
    """The model boundary: ``output`` with its texts under ``reporting.text``'s rule (invalid characters
    such as byte-fallback control bytes removed, length capped, never empty), so the stored draft, the
    text the API shows, the text a radiologist signs and the SR's Text Value are one and the same."""
    from reporting.text import clean_model_text

    changes: dict[str, Any] = {"findings_text": clean_model_text(output.findings_text)}
    impression = getattr(output, "impression_text", None)
    if impression is not None:
        changes["impression_text"] = clean_model_text(impression)
    if all(getattr(output, name) == value for name, value in changes.items()):
        return output
    log.info("model text cleaned", extra={"job": output.key})
    return dataclasses.replace(output, **changes)


def store_output(
    ctx: WorkerContext, prepared: Prepared, output: ReportOutput, batch_size: int, batch_wait_s: float = 0.0
) -> list[int]:
    """Report + SR + outbox via ``create_ai_draft``, Job DONE with timings; returns the export ids.

    The model's text is cleaned here (``clean_output``), before anything is stored.
    """
    from reporting.versions import create_ai_draft

    backend = ctx.require_backend()
    output = clean_output(output)
    started = time.perf_counter()
    with ctx.registry.session() as session:
        job = session.get(Job, prepared.claim.job_id)
        assert job is not None
        report = create_ai_draft(session, ctx.settings, prepared.claim.study_id, output, backend.provenance)
        session.flush()
        stored_s = time.perf_counter() - started
        timings = {"batch_wait": batch_wait_s, "preprocess": prepared.preprocess_s, **output.timings, "store": stored_s}
        job.timings = {**timings, "batch_size": batch_size}
        job.state = JobState.DONE.value
        job.worker = ctx.hostname
        job.error = None
        job.finished_at = utcnow()
        job.heartbeat_at = None
        export_ids = [e.id for e in report.exports if e.state == ExportState.PENDING.value]
        total = _seconds_between(job.queued_at, job.finished_at)
    for stage, seconds in timings.items():
        if stage not in COUNTS:
            metrics.STAGE_SECONDS.labels(stage=stage).observe(float(seconds))
    if total is not None:
        metrics.JOB_SECONDS.labels(priority=Priority.from_rank(prepared.claim.priority).value).observe(total)
    return export_ids


def give_back(ctx: WorkerContext, claims: Sequence[Claim], reason: str, *, except_job: int | None) -> None:
    """Requeue ``claims`` after a transient error; each gets a new message (``except_job`` is retried
    by Celery itself)."""
    for claim in claims:
        task_id = uuid.uuid4().hex
        with ctx.registry.session() as session:
            moved = requeue(session, claim.job_id, reason)
            if moved and claim.job_id != except_job:
                # the reconciler looks this id up in the broker: the new message must be the one it finds
                job = session.get(Job, claim.job_id)
                assert job is not None
                job.celery_task_id = task_id
        if moved and claim.job_id != except_job:
            send_report_task(ctx.settings, claim.job_id, task_id, countdown=5, priority=claim.priority)


def run_report_job(ctx: WorkerContext, job_id: int) -> str:
    """The body of ``radialog.report``: claim a batch around ``job_id``, run it, store every outcome."""
    backend = ctx.require_backend()
    settings = ctx.settings
    collect_started = time.perf_counter()
    try:
        claims = collect_batch(
            ctx.registry,
            job_id,
            worker=ctx.hostname,
            model_name=settings.model_backend,
            batch_size=ctx.batch_limit(settings.batch_size),
            wait_s=settings.batch_wait_ms / 1000,
            lease_s=ctx.lease_s,
            settings=settings,
        )
    except (OperationalError, PoolTimeout) as exc:  # jobs claimed before the error come back by lease
        metrics.FAILURES.labels(kind="transient").inc()
        raise TransientError(f"registry unavailable: {type(exc).__name__}") from exc
    if not claims:
        log.info("nothing to do: job done or running elsewhere", extra={"job": job_id})
        return "noop"
    batch_wait_s = time.perf_counter() - collect_started
    ctx.hold([c.job_id for c in claims])
    alone = claims[0].isolated  # a suspect of a crash: the only job in the process while it runs
    try:
        with ctx.gate.hold(alone):
            mark_running(ctx.registry, [(c.job_id, c.attempt) for c in claims], ALONE if alone else BATCH)
            if alone:
                log.info("running a job alone (its worker died while it ran with others)", extra={"job": job_id})
            return _run_claims(ctx, backend, claims, job_id, batch_wait_s)
    except (OperationalError, PoolTimeout) as exc:  # registry hiccup: give back what is not finished
        metrics.FAILURES.labels(kind="transient").inc()
        try:
            give_back(ctx, claims, "registry unavailable", except_job=job_id)
        except (OperationalError, PoolTimeout):
            log.warning("registry still unavailable: the jobs come back when their lease lapses")
        raise TransientError(f"registry unavailable: {type(exc).__name__}") from exc
    finally:
        ctx.release([c.job_id for c in claims])


def _run_claims(
    ctx: WorkerContext, backend: ModelBackend, claims: list[Claim], job_id: int, batch_wait_s: float
) -> str:
    from workers.models.base import StudyInput

    prepared: list[Prepared] = []
    for claim in claims:
        if claim.charged > MAX_ATTEMPTS:
            fail_job(ctx.registry, claim, f"gave up after {MAX_ATTEMPTS} attempts", "gave_up", ctx.settings)
            continue
        started = time.perf_counter()
        try:
            image = load_image(ctx.registry, ctx.settings, claim.study_id)
        except JobFailure as exc:
            fail_job(ctx.registry, claim, str(exc), "unusable_image", ctx.settings)
            continue
        prepared.append(Prepared(claim, image, time.perf_counter() - started))
    if not prepared:
        return "failed"
    metrics.BATCH_SIZE.observe(len(prepared))
    log.info("running batch", extra={"jobs": [p.claim.job_id for p in prepared], "worker": ctx.hostname})
    try:
        results = run_backend(
            backend,
            [StudyInput(key=str(p.claim.job_id), image=p.image, priority=p.claim.priority) for p in prepared],
            ctx.out_of_memory_at,
        )
    except TransientError as exc:
        metrics.FAILURES.labels(kind="transient").inc()
        give_back(ctx, [p.claim for p in prepared], str(exc), except_job=job_id)
        raise
    export_ids: list[int] = []
    try:
        for item in prepared:
            result = results.get(str(item.claim.job_id))
            if isinstance(result, Exception) or result is None:
                reason = f"model error: {type(result).__name__}: {result}" if result else "model returned nothing"
                fail_job(ctx.registry, item.claim, reason[:500], "model_error", ctx.settings)
                continue
            try:
                export_ids += store_output(ctx, item, result, len(prepared), batch_wait_s)
            except (OperationalError, PoolTimeout):
                raise  # transient: run_report_job gives back what is not stored
            except Exception as exc:  # the report cannot be stored (SR building, a bad header): say why
                log.warning("storing the report failed", extra={"job": item.claim.job_id}, exc_info=True)
                fail_job(
                    ctx.registry,
                    item.claim,
                    f"storing the report failed: {type(exc).__name__}: {exc}"[:500],
                    "store_error",
                    ctx.settings,
                )
    finally:
        if export_ids:
            send_export_tasks(ctx.settings, export_ids)
    log.info("batch stored", extra={"jobs": [p.claim.job_id for p in prepared], "exports": len(export_ids)})
    return "done"
