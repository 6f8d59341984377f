"""How often radiologists agree with the AI: per CheXpert finding, over the approvals of a period.

The radiologist's verdict is the reference. For each finding: TP = AI present and radiologist present,
FP = AI present, radiologist absent, FN = AI absent, radiologist present, TN = both absent; sensitivity
TP / (TP + FN), specificity TN / (TN + FP), PPV TP / (TP + FP), each with a 95% Wilson score interval
(better than the normal approximation for small counts and for proportions near 0 or 1; never outside
[0, 1]). A draft approved more than once (approved, edited, approved again) counts once: its latest
approval in the period. A draft is "unchanged" when its signed text equals it character for character
(Levenshtein distance 0, ``reporting.agreement``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from statistics import NormalDist, median
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radialog.registry import ApprovalReview, FindingVerdict

#: Two-sided 95%: the standard normal's 97.5th percentile (1.959964...).
Z95 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class Proportion:
    """k of n, with its 95% Wilson score interval (None when n is 0: nothing to estimate)."""

    k: int
    n: int

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson(self.k, self.n)

    def to_dict(self) -> dict[str, Any]:
        low_high = self.interval
        return {
            "k": self.k,
            "n": self.n,
            "value": self.value,
            "ci95": None if low_high is None else [low_high[0], low_high[1]],
        }


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials (Wilson 1927; Newcombe 1998, method 3)."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k must be within 0..n, not {k} of {n}")
    p = k / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, ai: bool, radiologist: bool, count: int = 1) -> None:
        if ai and radiologist:
            self.tp += count
        elif ai:
            self.fp += count
        elif radiologist:
            self.fn += count
        else:
            self.tn += count

    def to_dict(self, label: str) -> dict[str, Any]:
        n = self.tp + self.fp + self.fn + self.tn
        return {
            "label": label,
            "n": n,
            "ai_present": self.tp + self.fp,
            "radiologist_present": self.tp + self.fn,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "agreement": Proportion(self.tp + self.tn, n).to_dict(),
            "sensitivity": Proportion(self.tp, self.tp + self.fn).to_dict(),
            "specificity": Proportion(self.tn, self.tn + self.fp).to_dict(),
            "ppv": Proportion(self.tp, self.tp + self.fp).to_dict(),
        }


def _latest_reviews(start: datetime, end: datetime, model_name: str | None) -> Any:
    """Ids of the latest review of each draft approved in [start, end) (a subquery)."""
    query = select(func.max(ApprovalReview.id)).where(
        ApprovalReview.approved_at >= start, ApprovalReview.approved_at < end
    )
    if model_name:
        query = query.where(func.lower(ApprovalReview.model_name) == model_name.lower())
    return query.group_by(ApprovalReview.draft_id)


def _day(session: Session) -> Any:
    """The UTC calendar day of ``approved_at`` as 'YYYY-MM-DD', in the database's own dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", ApprovalReview.approved_at), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", ApprovalReview.approved_at)  # SQLite keeps UTC without an offset


def _period(day: str, bucket: str) -> str:
    if bucket == "week":  # the Monday that starts the ISO week
        d = date.fromisoformat(day)
        return (d - timedelta(days=d.weekday())).isoformat()
    return day


def agreement(
    session: Session, start: datetime, end: datetime, *, model_name: str | None = None, bucket: str = "day"
) -> dict[str, Any]:
    """The agreement figures of the drafts approved in [start, end), for one model or all."""
    if bucket not in ("day", "week"):
        raise ValueError("bucket is 'day' or 'week'")
    latest = _latest_reviews(start, end, model_name)
    reviews = session.execute(
        select(
            ApprovalReview.id,
            ApprovalReview.edit_distance,
            ApprovalReview.draft_chars,
            ApprovalReview.checklist,
            ApprovalReview.model_name,
            _day(session),
        ).where(ApprovalReview.id.in_(latest))
    ).all()
    by_label: dict[str, Counts] = {}
    order: list[str] = []
    rows = session.execute(
        select(FindingVerdict.label, FindingVerdict.ai_present, FindingVerdict.radiologist_present, func.count())
        .where(FindingVerdict.review_id.in_(latest))
        .group_by(FindingVerdict.label, FindingVerdict.ai_present, FindingVerdict.radiologist_present)
        .order_by(func.min(FindingVerdict.id))
    ).all()
    for label, ai, radiologist, count in rows:
        if label not in by_label:
            by_label[label] = Counts()
            order.append(label)
        by_label[label].add(bool(ai), bool(radiologist), int(count))

    day_of = {review_id: day for review_id, *_rest, day in reviews}
    timeline: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for review_id, label, agree, count in session.execute(
        select(FindingVerdict.review_id, FindingVerdict.label, FindingVerdict.agree, func.count())
        .where(FindingVerdict.review_id.in_(latest))
        .group_by(FindingVerdict.review_id, FindingVerdict.label, FindingVerdict.agree)
    ):
        cell = timeline[_period(day_of[review_id], bucket)][label]
        cell[0] += int(count) if agree else 0
        cell[1] += int(count)
    drafts_by_period: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _id, distance, _chars, _checklist, _model, day in reviews:
        counts = drafts_by_period[_period(day, bucket)]
        counts[0] += distance == 0
        counts[1] += 1

    distances = [r.edit_distance for r in reviews]
    unchanged = sum(1 for d in distances if d == 0)
    ratios = [r.edit_distance / max(r.draft_chars, 1) for r in reviews]
    periods = sorted(set(timeline) | set(drafts_by_period))
    return {
        "from": start,
        "to": end,
        "backend": model_name,
        "bucket": bucket,
        "drafts": {
            "approved": len(reviews),
            "unchanged": unchanged,
            "edited": len(reviews) - unchanged,
            "share_unchanged": Proportion(unchanged, len(reviews)).to_dict(),
            "with_checklist": sum(1 for r in reviews if r.checklist),
            "edit_distance": {
                "median": median(distances) if distances else None,
                "max": max(distances) if distances else None,
                "median_per_draft_char": median(ratios) if ratios else None,
            },
        },
        "findings": [by_label[label].to_dict(label) for label in order],
        "timeline": [
            {
                "period": period,
                "drafts": {"approved": drafts_by_period[period][1], "unchanged": drafts_by_period[period][0]},
                "findings": {
                    label: {"agree": cell[0], "n": cell[1], "agreement": Proportion(cell[0], cell[1]).to_dict()}
                    for label, cell in timeline[period].items()
                },
            }
            for period in periods
        ],
        "backends": sorted({r.model_name for r in reviews if r.model_name}),
    }


def backends(session: Session) -> list[str]:
    """Every model name that has an approved draft (the choices of the ``backend`` filter)."""
    return sorted(n for n in session.scalars(select(ApprovalReview.model_name).distinct()) if n)
