"""The figures of the operations page, read from the registry and the broker at request time.

Studies per hour by state, last image -> SR latency percentiles, queue depths, ready workers and their
engines' slots, why studies were not reported, and the export outbox. Only aggregates: no patient data.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.services import Services
from radialog.logging import get_logger
from radialog.registry import Export, ExportState, Report, ReportKind, Study, StudyState, utcnow
from radialog.settings import Settings

log = get_logger(__name__)

#: Longest reason shown (reasons are ours: "lateral view only", an error class and its message).
REASON_CHARS = 160


def _hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


def percentiles(values: list[float]) -> dict[str, Any]:
    """p50/p90/p95/p99 (linear interpolation between order statistics, numpy's default) and the max."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    p50, p90, p95, p99 = (float(v) for v in np.percentile(np.asarray(values, dtype=float), [50, 90, 95, 99]))
    return {"n": len(values), "p50": p50, "p90": p90, "p95": p95, "p99": p99, "max": float(max(values))}


def studies_per_hour(session: Session, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Studies received in each hour of [start, end) by their state now; every hour listed, zeros too."""
    hours: dict[datetime, Counter[str]] = {}
    hour = _hour(start)
    while hour < end:
        hours[hour] = Counter()
        hour += timedelta(hours=1)
    for created, state in session.execute(
        select(Study.created_at, Study.state).where(Study.created_at >= start, Study.created_at < end)
    ):
        hours.setdefault(_hour(created), Counter())[state] += 1
    return [{"hour": h, "counts": dict(c)} for h, c in sorted(hours.items())]


def latency(session: Session, settings: Settings, start: datetime, end: datetime) -> dict[str, Any]:
    """Seconds from each study's last image to its AI draft (SR written), and to the first SR destination
    (``Destination.carries_sr``: PACS, DICOMweb) that accepted that SR, over the drafts made in [start, end).
    Webhook, HL7 and FHIR rows share the exports table; they carry no SR, so they do not count as "PACS"."""
    to_sr: list[float] = []
    to_pacs: list[float] = []
    sr_destinations = [d.name for d in settings.destinations if d.carries_sr]
    sent = (
        select(Export.report_id, func.min(Export.sent_at).label("sent_at"))
        .where(Export.state == ExportState.SENT.value, Export.destination.in_(sr_destinations))
        .group_by(Export.report_id)
        .subquery()
    )
    rows = session.execute(
        select(Study.last_instance_at, Report.created_at, sent.c.sent_at)
        .join(Report, Report.study_id == Study.id)
        .outerjoin(sent, sent.c.report_id == Report.id)
        .where(
            Report.kind == ReportKind.AI_DRAFT.value,
            Report.created_at >= start,
            Report.created_at < end,
            Study.last_instance_at.is_not(None),
        )
    )
    for last_image, written, accepted in rows:
        seconds = (written - last_image).total_seconds()
        if seconds >= 0:  # an image that came after the draft re-opened nothing: not a latency
            to_sr.append(seconds)
        if accepted is not None and (pacs := (accepted - last_image).total_seconds()) >= 0:
            to_pacs.append(pacs)
    return {"image_to_sr": percentiles(to_sr), "image_to_pacs": percentiles(to_pacs)}


def not_reported(session: Session, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Studies received in [start, end) that are FAILED or SKIPPED now, counted by state and reason."""
    counts: Counter[tuple[str, str]] = Counter()
    for state, reason in session.execute(
        select(Study.state, Study.reason).where(
            Study.created_at >= start,
            Study.created_at < end,
            Study.state.in_([StudyState.FAILED.value, StudyState.SKIPPED.value]),
        )
    ):
        counts[(state, (reason or "no reason recorded")[:REASON_CHARS])] += 1
    return [{"state": s, "reason": r, "count": n} for (s, r), n in counts.most_common()]


def exports(session: Session) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Outbox rows by state, and the DEAD ones by destination and last error."""
    by_state = {s.value: 0 for s in ExportState}
    for state, count in session.execute(select(Export.state, func.count()).group_by(Export.state)):
        by_state[state] = int(count)
    dead: Counter[tuple[str, str]] = Counter()
    for destination, error, count in session.execute(
        select(Export.destination, Export.last_error, func.count())
        .where(Export.state == ExportState.DEAD.value)
        .group_by(Export.destination, Export.last_error)
    ):
        dead[(destination, (error or "no error recorded")[:REASON_CHARS])] += int(count)
    return by_state, [{"destination": d, "reason": r, "count": n} for (d, r), n in dead.most_common()]


def queue_depths(services: Services) -> dict[str, Any]:
    """Messages waiting per queue (``radialog.messaging.queue_depths``); unavailable, with the reason, when
    the broker does not answer."""
    from radialog.messaging import BrokerUnavailable, queue_depths

    try:
        return {"available": True, "depths": queue_depths(services.settings), "error": None}
    except BrokerUnavailable as exc:
        log.warning("queue depths unavailable: broker unreachable")
        return {"available": False, "depths": {}, "error": str(exc)}


def workers(services: Services) -> dict[str, Any]:
    """Workers whose readiness announcement is alive (model loaded; ``radialog.presence``: Redis keys or the
    embedded broker's files), with their engines' slots per kind."""
    from radialog.presence import BrokerUnavailable

    try:
        ready = services.ready_workers()
    except (BrokerUnavailable, redis.RedisError) as exc:
        return {"available": False, "ready": [], "error": str(exc) or type(exc).__name__}
    out = []
    for info in sorted(ready, key=lambda w: str(w.get("worker"))):
        engine = found if isinstance(found := info.get("engine"), dict) else {}
        slots = {
            kind: int(pool["slots"])
            for kind, pool in engine.items()
            if isinstance(pool, dict) and isinstance(pool.get("slots"), int)
        }
        out.append(
            {
                "name": str(info.get("worker")),
                "model": info.get("name"),
                "version": info.get("version"),
                "device": info.get("device"),
                "tiny": info.get("tiny"),
                "slots": slots,
            }
        )
    return {"available": True, "ready": out, "error": None}


def overview(session: Session, services: Services, hours: int) -> dict[str, Any]:
    """Everything the operations page draws, for the last ``hours`` hours."""
    end = utcnow()
    start = _hour(end) - timedelta(hours=hours - 1)  # the current hour is the last bar
    by_state, dead = exports(session)
    return {
        "generated_at": end,
        "hours": hours,
        "from": start,
        "states": [s.value for s in StudyState],
        "studies_per_hour": studies_per_hour(session, start, end + timedelta(microseconds=1)),
        "latency": latency(session, services.settings, start, end + timedelta(microseconds=1)),
        "queues": queue_depths(services),
        "workers": workers(services),
        "not_reported": not_reported(session, start, end + timedelta(microseconds=1)),
        "exports": by_state,
        "dead_exports": dead,
    }
