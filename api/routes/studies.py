"""Studies: the worklist with filters and paging, one study with instances and history, re-run."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from api import audit
from api.deps import DB, AnyUser, AppRegistry, AppSettings, Operator
from api.lookups import get_study
from api.problems import Problem, problem_responses
from api.schemas import (
    NO_CONTROL_CHARACTERS,
    EventOut,
    InstanceOut,
    RerunOut,
    StudyDetail,
    StudyId,
    StudyPage,
    StudySummary,
)
from radialog.logging import get_logger
from radialog.messaging import RERUNNABLE, enqueue_report, queue_again
from radialog.registry import Report, Study, StudyState
from radialog.routing import Priority

log = get_logger(__name__)
router = APIRouter(prefix="/studies", tags=["studies"])
_AUTH = problem_responses(401, 403)


def _summaries(session: DB, studies: list[Study]) -> list[StudySummary]:
    """Worklist rows with each study's newest report version, in one query for the whole page."""
    ids = [s.id for s in studies]
    newest = (
        select(Report.study_id, func.max(Report.version).label("version"))
        .where(Report.study_id.in_(ids))
        .group_by(Report.study_id)
        .subquery()
    )
    latest = (
        {
            study_id: (version, verified)
            for study_id, version, verified in session.execute(
                select(Report.study_id, Report.version, Report.verified).join(
                    newest, (Report.study_id == newest.c.study_id) & (Report.version == newest.c.version)
                )
            )
        }
        if ids
        else {}
    )
    out = []
    for study in studies:
        summary = StudySummary.model_validate(study)
        summary.routing_rule = (study.routing or {}).get("rule")
        if study.id in latest:
            summary.latest_report_version, summary.verified = latest[study.id]
        out.append(summary)
    return out


@router.get("", response_model=StudyPage, responses={**_AUTH, **problem_responses(422)})
def list_studies(
    session: DB,
    who: AnyUser,
    state: Annotated[list[StudyState] | None, Query(description="One or more states")] = None,
    date_from: Annotated[date | None, Query(description="Study date on or after (YYYY-MM-DD)")] = None,
    date_to: Annotated[date | None, Query(description="Study date on or before (YYYY-MM-DD)")] = None,
    accession: Annotated[str | None, Query(max_length=64, pattern=NO_CONTROL_CHARACTERS)] = None,
    priority: Annotated[list[Priority] | None, Query(description="One or more priorities (HIGH, ROUTINE, LOW)")] = None,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> StudyPage:
    """The worklist, newest first."""
    query = select(Study)
    if state:
        query = query.where(Study.state.in_([s.value for s in state]))
    if date_from:
        query = query.where(Study.study_date >= date_from.strftime("%Y%m%d"))
    if date_to:
        query = query.where(Study.study_date <= date_to.strftime("%Y%m%d"))
    if accession:
        query = query.where(Study.accession_number == accession)
    if priority:
        query = query.where(Study.priority.in_([p.value for p in priority]))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Study.created_at.desc(), Study.id.desc()).offset(offset).limit(limit))
    items = _summaries(session, list(rows))
    audit.record(session, who, "study.list", None, count=len(items))
    session.commit()
    return StudyPage(items=items, total=total, offset=offset, limit=limit)


@router.get("/{study_id}", response_model=StudyDetail, responses={**_AUTH, **problem_responses(404, 422)})
def read_study(study_id: StudyId, session: DB, who: AnyUser) -> StudyDetail:
    """One study: state and reason, instances (header fields), and its whole state history."""
    study = get_study(session, study_id)
    [summary] = _summaries(session, [study])
    detail = StudyDetail(
        **summary.model_dump(),
        instances=[
            InstanceOut.model_validate(i).model_copy(update={"selected": i.id == study.selected_instance_id})
            for i in study.instances
        ],
        history=[EventOut.model_validate(e) for e in study.events],
        selected_instance_id=study.selected_instance_id,
    )
    audit.record(session, who, "study.read", study.id)
    session.commit()
    return detail


@router.post(
    "/{study_id}/rerun",
    response_model=RerunOut,
    status_code=202,
    responses={**_AUTH, **problem_responses(404, 409, 422)},
)
def rerun_study(
    study_id: StudyId, session: DB, who: Operator, registry: AppRegistry, settings: AppSettings
) -> RerunOut:
    """Queue a FAILED or SKIPPED study again (radiologist or admin)."""
    study = get_study(session, study_id)
    if study.state not in {s.value for s in RERUNNABLE}:
        raise Problem(409, "not-rerunnable", f"only FAILED or SKIPPED studies can be re-run; this one is {study.state}")
    if not queue_again(session, study.id, f"re-run requested by {who.name}"):
        raise Problem(409, "not-rerunnable", "the study changed state meanwhile")
    audit.record(session, who, "study.rerun", study.id)
    session.commit()
    enqueued = False
    try:
        enqueue_report(registry, settings, study.id)
        enqueued = True
    except Exception:  # the study is QUEUED in the registry: the reconciler re-sends it
        log.exception("enqueue failed; left QUEUED for the reconciler", extra={"study": study.id})
    return RerunOut(study_id=study.id, state=StudyState.QUEUED.value, enqueued=enqueued)
