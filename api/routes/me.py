"""Who is signed in: the page's header shows the key's user name and role."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import AnyUser
from api.problems import problem_responses
from api.schemas import Me

router = APIRouter(tags=["users"])


@router.get("/me", response_model=Me, responses=problem_responses(401, 403))
def me(who: AnyUser) -> Me:
    """The user name and role of the API key sent (no patient data, not audited)."""
    return Me(name=who.name, role=who.role)
