"""The approval checklist: checked before the approval version is written, stored in its transaction.

The verdicts are about the AI draft the approved version descends from; they are refused (nothing
written, no SR file) when they do not cover every finding of that draft (422) or show other AI calls than
the draft's (409: what was judged is not what the server has).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from api.problems import Problem
from api.schemas import FindingVerdictIn
from radialog.registry import Report


def checked_verdicts(current: Report, checklist: Sequence[FindingVerdictIn] | None):  # -> list[Verdict] | None
    """The checklist as ``reporting.agreement`` verdicts, checked against ``current``'s AI draft."""
    from reporting.agreement import ChecklistError, ChecklistMismatch, Verdict, draft_of, validate

    if checklist is None:
        return None
    verdicts = [Verdict(v.label, v.ai_present, v.verdict == "agree") for v in checklist]
    draft = draft_of(current)
    if draft is None:
        if verdicts:
            raise Problem(422, "invalid-checklist", "this report has no AI draft to judge")
        return None
    try:
        validate(draft, verdicts)
    except ChecklistMismatch as exc:
        raise Problem(409, "checklist-mismatch", str(exc)) from exc
    except ChecklistError as exc:
        raise Problem(422, "invalid-checklist", str(exc)) from exc
    return verdicts


def store_review(session: Session, approval: Report, verdicts) -> None:  # verdicts: list[Verdict] | None
    """The review of ``approval`` (edit distance, verdicts) in the session's transaction."""
    from reporting.agreement import record_review

    record_review(session, approval, verdicts)
