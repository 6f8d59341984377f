"""The operations page's figures, for admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api import audit
from api.deps import DB, Admin, AppServices
from api.operations import overview
from api.problems import problem_responses
from api.quality_schemas import OverviewOut

router = APIRouter(prefix="/operations", tags=["operations"])


@router.get("/overview", response_model=OverviewOut, responses=problem_responses(401, 403, 422))
def read_overview(
    session: DB,
    who: Admin,
    services: AppServices,
    hours: Annotated[int, Query(ge=1, le=168, description="Hours back, the current one included")] = 24,
) -> OverviewOut:
    """Studies per hour by state, last image -> SR latency percentiles, queue depths, ready workers and
    their engines' slots, why studies were not reported, and the export outbox."""
    figures = overview(session, services, hours)
    audit.record(session, who, "operations.read", None, hours=hours)
    session.commit()
    return OverviewOut.model_validate(figures)
