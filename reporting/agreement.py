"""What a radiologist's approval says about the AI draft: a verdict per CheXpert finding and the edit distance.

The approval checklist shows each finding of the draft's classifier (present / absent). Where the text
being signed names a finding in the model's own phrase (the label in lower case, as in the "Predicted
Findings" prompt: "pleural effusion"), ``suggest`` proposes the verdict the text implies, with the clause
that says so; where the text does not name it, or names it uncertainly ("possible pneumonia") or both ways,
nothing is proposed and the radiologist decides. Nothing is ever filled in silently: the page shows each
proposal and its evidence, and the server stores which verdicts were proposals (``FindingVerdict.suggested``).

``record_review`` stores the review in the caller's transaction, beside the approval version it belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rapidfuzz.distance import Levenshtein
from sqlalchemy.orm import Session

from radialog.chexpert import NO_FINDING
from radialog.registry import ApprovalReview, FindingVerdict, Report, ReportKind
from reporting.text import clean_text

Stated = Literal["present", "absent"]
Suggestion = Literal["agree", "disagree"]

# CheXpert's catch-all label (NO_FINDING) has no phrase of its own in a report: never proposed from the text.
#: Words before a finding, in the same clause, that deny it ("no pleural effusion", "without edema").
_NEGATION_BEFORE = re.compile(
    r"\b(no|not|without|negative for|free of|absence of|absent|resolved|resolution of|ruled out|rules out|"
    r"excluded|neither|nor|clear of)\b"
)
#: Words right after a finding that deny it ("pneumothorax is not seen", "effusion has resolved").
_NEGATION_AFTER = re.compile(
    r"^\W*(is|are|has|have)?\s*(not|no longer|absent|resolved|excluded|ruled out|been excluded)\b"
)
#: Hedges: the text neither affirms nor denies ("cannot exclude pneumonia", "possible atelectasis").
_UNCERTAIN = re.compile(
    r"\b(possible|possibly|probable|probably|may|might|could|cannot|can not|questionable|suspected|"
    r"suspicious|suspicion|concerning for|likely|versus|vs|differential|equivocal|indeterminate)\b"
)
#: "no change in ...", "not only": a "no"/"not" that denies something else.
_PSEUDO_NEGATION = re.compile(r"\b(no (significant |interval )?(change|increase|decrease|worsening)|not only)\b")
#: Clause boundaries: a negation does not reach past these.
_CLAUSES = re.compile(r"[.;:!?\n]+|\bbut\b|\bhowever\b|\balthough\b|\bexcept\b|\bwhich\b")


class ChecklistError(ValueError):
    """The checklist sent is not one verdict for each finding of the draft (422)."""


class ChecklistMismatch(ValueError):
    """The checklist sent shows other classifier findings than the draft's (409: it was not what was shown)."""


@dataclass(frozen=True)
class Verdict:
    """One line of the checklist as the radiologist left it."""

    label: str
    ai_present: bool  # as shown on the page: must be the draft's
    agree: bool


@dataclass(frozen=True)
class ChecklistItem:
    """One finding of the draft, with what the signed text says about it (if it says anything)."""

    label: str
    ai_present: bool
    probability: float | None
    stated: Stated | None  # what the text says; None: not named, named uncertainly, or named both ways
    suggestion: Suggestion | None
    evidence: str | None  # the clause(s) the proposal comes from

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "ai_present": self.ai_present,
            "probability": self.probability,
            "stated": self.stated,
            "suggestion": self.suggestion,
            "evidence": self.evidence,
        }


def draft_of(report: Report) -> Report | None:
    """The AI draft this version descends from (the nearest ``ai_draft`` among its predecessors)."""
    seen: set[int] = set()
    current: Report | None = report
    while current is not None and current.id not in seen:
        if current.kind == ReportKind.AI_DRAFT.value:
            return current
        seen.add(current.id)
        current = current.predecessor
    return None


def shown_text(report: Report) -> str:
    """Findings and impression as every channel shows them (``reporting.text``): what is compared."""
    findings = clean_text(report.findings_text or "")
    impression = clean_text(report.impression_text) if report.impression_text else ""
    return f"{findings}\n\n{impression}" if impression else findings


def edit_distance(draft: str, signed: str) -> int:
    """Characters inserted, deleted or substituted to turn ``draft`` into ``signed`` (Levenshtein)."""
    return int(Levenshtein.distance(draft, signed))


def _phrase(label: str) -> re.Pattern[str]:
    words = r"\s+".join(re.escape(w) for w in label.lower().split())
    return re.compile(rf"\b{words}(s|es)?\b")


def stated(label: str, text: str) -> tuple[Stated | None, str | None]:
    """What ``text`` says about the finding ``label``, in the model's phrase: present, absent or nothing
    (not named, hedged, or named both ways), and the clause(s) that say it."""
    if label == NO_FINDING:
        return None, None
    pattern = _phrase(label)
    verdicts: set[Stated] = set()
    evidence: list[str] = []
    for clause in _CLAUSES.split(text):
        lowered = clause.lower()
        for match in pattern.finditer(lowered):
            before = _PSEUDO_NEGATION.sub(" ", lowered[: match.start()])
            if _UNCERTAIN.search(lowered):
                return None, clause.strip()[:240]
            negated = bool(_NEGATION_BEFORE.search(before) or _NEGATION_AFTER.search(lowered[match.end() :]))
            verdicts.add("absent" if negated else "present")
            if clause.strip() not in evidence:
                evidence.append(clause.strip())
    if len(verdicts) != 1:
        return None, ("; ".join(evidence)[:240] or None)
    return verdicts.pop(), "; ".join(evidence)[:240]


def checklist(draft: Report, signed: Report) -> list[ChecklistItem]:
    """The draft's classifier findings with what the text of ``signed`` says about each."""
    text = shown_text(signed)
    items = []
    for finding in draft.findings or []:
        label, present = str(finding["label"]), bool(finding["present"])
        says, evidence = stated(label, text)
        suggestion: Suggestion | None = None
        if says is not None:
            suggestion = "agree" if (says == "present") == present else "disagree"
        probability = finding.get("probability")
        items.append(
            ChecklistItem(
                label, present, None if probability is None else float(probability), says, suggestion, evidence
            )
        )
    return items


def validate(draft: Report, verdicts: Sequence[Verdict]) -> None:
    """Raise unless ``verdicts`` hold exactly one verdict per finding of ``draft``, with its AI calls."""
    expected = {str(f["label"]): bool(f["present"]) for f in draft.findings or []}
    labels = [v.label for v in verdicts]
    if len(set(labels)) != len(labels):
        raise ChecklistError("the checklist names a finding twice")
    if set(labels) != set(expected):
        missing, extra = sorted(set(expected) - set(labels)), sorted(set(labels) - set(expected))
        raise ChecklistError(
            f"the checklist needs one verdict for each finding of the AI draft "
            f"(missing: {missing or 'none'}; not in the draft: {extra or 'none'})"
        )
    shown_wrong = sorted(v.label for v in verdicts if v.ai_present != expected[v.label])
    if shown_wrong:
        raise ChecklistMismatch(f"the checklist shows other AI findings than the draft's for {shown_wrong}; reload")


def record_review(session: Session, approval: Report, verdicts: Sequence[Verdict] | None) -> ApprovalReview | None:
    """Store what ``approval`` says about its AI draft, in the caller's transaction (the approval's own).

    ``verdicts`` None: no checklist was sent (an API client); the edit distance is still recorded.
    Raises ``ChecklistError`` / ``ChecklistMismatch`` before anything is added. None when the version
    has no AI draft behind it.
    """
    draft = draft_of(approval)
    if draft is None:
        return None
    if verdicts is not None:
        validate(draft, verdicts)
    proposals = {item.label: item for item in checklist(draft, approval)}
    before, after = shown_text(draft), shown_text(approval)
    review = ApprovalReview(
        report_id=approval.id,
        draft_id=draft.id,
        study_id=approval.study_id,
        model_name=draft.model_name,
        model_version=draft.model_version,
        approved_at=approval.verified_at or approval.created_at,
        draft_chars=len(before),
        approved_chars=len(after),
        edit_distance=edit_distance(before, after),
        checklist=bool(verdicts) and bool(draft.findings),
    )
    session.add(review)
    session.flush()
    for verdict in verdicts or ():
        item = proposals[verdict.label]
        session.add(
            FindingVerdict(
                review_id=review.id,
                label=verdict.label,
                ai_present=item.ai_present,
                ai_probability=item.probability,
                radiologist_present=item.ai_present == verdict.agree,
                agree=verdict.agree,
                suggested=item.suggestion,
            )
        )
    session.flush()
    return review
