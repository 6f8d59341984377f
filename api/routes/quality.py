"""How often radiologists agree with the AI (``reporting.quality``), and the approval checklist of a version."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api import audit
from api.deps import DB, AnyUser, Operator
from api.lookups import get_study, get_version, require_report
from api.problems import problem_responses
from api.quality_schemas import AgreementOut, ChecklistItemOut, ChecklistOut
from api.schemas import MAX_ID, QueryInstant, StudyId
from radialog.registry import utcnow

router = APIRouter(tags=["quality"])
#: The longest period one request may cover.
MAX_PERIOD = timedelta(days=366)
METHOD = (
    "Radiologist's verdict as reference; sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV TP/(TP+FP); "
    "95% Wilson score intervals; each AI draft counted once (its latest approval in the period)."
)


@router.get("/quality/agreement", response_model=AgreementOut, responses=problem_responses(401, 403, 422))
def read_agreement(
    session: DB,
    who: Operator,
    from_: Annotated[
        QueryInstant | None, Query(alias="from", description="Approved on or after (default: 30 days ago)")
    ] = None,
    to: Annotated[QueryInstant | None, Query(description="Approved before (default: now)")] = None,
    backend: Annotated[
        str | None, Query(max_length=64, description="The draft's model name, e.g. RaDialog-LLaVA, XrayGPT")
    ] = None,
    bucket: Annotated[Literal["day", "week"], Query(description="Period of the timeline")] = "day",
) -> AgreementOut:
    """Per CheXpert finding: AI-present and radiologist-present counts, sensitivity, specificity and PPV
    with 95% intervals; the share of drafts approved unchanged vs edited; agreement per finding over time.
    The period answered is at most 366 days, ending at ``to``; ``from`` after ``to`` is an empty period."""
    from reporting.quality import agreement, backends

    end = to or utcnow()
    start = from_ or end - timedelta(days=30)
    # The period answered is in the body ("from", "to"): at most MAX_PERIOD back from "to" (the work per
    # request stays bounded), and empty when "from" is not before "to".
    if end - start > MAX_PERIOD:
        start = end - MAX_PERIOD
    start = min(start, end)
    figures = agreement(session, start, end, model_name=backend or None, bucket=bucket)
    figures["backends"] = backends(session)
    figures["method"] = METHOD
    audit.record(session, who, "quality.read", None, backend=backend)
    session.commit()
    return AgreementOut.model_validate(figures)


@router.get(
    "/studies/{study_id}/report/checklist",
    response_model=ChecklistOut,
    responses=problem_responses(401, 403, 404, 409, 422),
)
def report_checklist(
    study_id: StudyId,
    session: DB,
    who: AnyUser,
    version: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Default: the current version")] = None,
) -> ChecklistOut:
    """The AI draft's CheXpert findings to judge when approving ``version``, each with the verdict its text
    implies where it names the finding in the model's phrase (a suggestion the radiologist confirms)."""
    from reporting.agreement import checklist, draft_of

    study = get_study(session, study_id)
    report = get_version(session, study_id, version) if version else require_report(session, study)
    draft = draft_of(report)
    items = checklist(draft, report) if draft is not None else []
    audit.record(session, who, "report.checklist", study_id, version=report.version)
    session.commit()
    return ChecklistOut(
        study_id=study_id,
        version=report.version,
        draft_version=draft.version if draft else None,
        model_name=draft.model_name if draft else None,
        items=[ChecklistItemOut(**item.to_dict()) for item in items],
    )
