"""Routing rules: which studies get a pre-read, and how urgently. Pure: rules in, a decision out.

Rules come from settings (``RADIALOG_ROUTING_RULES`` as JSON, or ``[[routing_rules]]`` tables in the TOML
file) and are validated when the settings are read, so a typo stops ``radialog node`` at start with the
field named, never at the first study. The first rule whose ``match`` fits the study decides:
``action = "report"`` queues it with the rule's ``priority``, ``action = "skip"`` makes it SKIPPED with the
rule's ``reason``. No rule fits: the study is reported at ROUTINE priority (as before rules existed).

Facts a rule can test (``StudyFacts``): the calling AE title, modality, body part, station, institution,
study description, the patient's age in years, the C-STORE request's Priority field (0000,0700) and
whether the order carries a STAT marker (Requested Procedure Priority STAT/HIGH, or the word STAT in
the Reason for the Requested Procedure). Text tests are case-insensitive shell-style patterns
(``CHEST*``); a pattern list matches when any pattern does. A fact that is unknown never matches a test
on it: an unknown age is not "under 18", and the decision says the age is unknown (the SR says so too).
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Priority(str, enum.Enum):
    """How urgently a study is read; HIGH before ROUTINE before LOW everywhere (queues, engine, worklist)."""

    HIGH = "HIGH"
    ROUTINE = "ROUTINE"
    LOW = "LOW"

    @property
    def rank(self) -> int:
        """0 for the most urgent: sorts HIGH first (registry ``Job.priority``, engine admission)."""
        return _RANK[self]

    @classmethod
    def from_rank(cls, rank: int | None) -> Priority:
        return next((p for p, r in _RANK.items() if r == rank), cls.ROUTINE)


_RANK = {Priority.HIGH: 0, Priority.ROUTINE: 1, Priority.LOW: 2}

#: The C-STORE request's Priority (0000,0700): 0 MEDIUM, 1 HIGH, 2 LOW (PS3.7 C.4.2.1.5).
STORE_PRIORITIES = {0: "MEDIUM", 1: "HIGH", 2: "LOW"}
#: Requested Procedure Priority (0040,1003) values that mean "read this first".
STAT_PRIORITIES = frozenset({"STAT", "HIGH"})
_STAT_WORD = re.compile(r"\bSTAT\b", re.IGNORECASE)

PEDIATRIC_REASON = "patient under 18: the model was trained on adults"
AGE_UNKNOWN_NOTE = "patient age unknown: the model was trained on adults (18 and older)"


class RuleMatch(BaseModel):
    """What a study must show for a rule to apply; every test given must pass (AND), none given = any study."""

    model_config = ConfigDict(extra="forbid")

    calling_ae_titles: list[str] | None = None
    modalities: list[str] | None = None
    body_parts: list[str] | None = None
    stations: list[str] | None = None
    institutions: list[str] | None = None
    study_descriptions: list[str] | None = None
    patient_age_below: float | None = Field(None, ge=0, le=150)
    patient_age_at_least: float | None = Field(None, ge=0, le=150)
    store_priorities: list[Literal["LOW", "MEDIUM", "HIGH"]] | None = None
    stat: bool | None = None

    @field_validator("calling_ae_titles", "modalities", "body_parts", "stations", "institutions", "study_descriptions")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not p.strip() for p in value)):
            raise ValueError("a pattern list needs at least one non-empty pattern")
        return value


class RoutingRule(BaseModel):
    """One rule: a name (shown in the API and by ``radialog rules test``), a match, and what to do."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    match: RuleMatch = Field(default_factory=RuleMatch)
    action: Literal["report", "skip"] = "report"
    priority: Priority = Priority.ROUTINE
    reason: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _skip_says_why(self) -> RoutingRule:
        if self.action == "skip" and not (self.reason or "").strip():
            raise ValueError(f"rule {self.name!r}: a skip rule needs a reason (it is shown to users)")
        return self


def default_rules() -> list[RoutingRule]:
    """Adults only; HIGH for a C-STORE HIGH priority or a STAT order; everything else ROUTINE.

    (Only chest CR/DX images reach the rules: the image choice skips the rest, as it always did.)
    """
    return [
        RoutingRule(name="under-18", match=RuleMatch(patient_age_below=18), action="skip", reason=PEDIATRIC_REASON),
        RoutingRule(name="store-priority-high", match=RuleMatch(store_priorities=["HIGH"]), priority=Priority.HIGH),
        RoutingRule(name="stat-order", match=RuleMatch(stat=True), priority=Priority.HIGH),
        RoutingRule(name="routine"),
    ]


def validate_rules(rules: Sequence[RoutingRule]) -> list[RoutingRule]:
    """Names must be unique (a decision names its rule)."""
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ValueError(f"routing rule name {rule.name!r} is used twice")
        seen.add(rule.name)
    return list(rules)


@dataclass(frozen=True)
class StudyFacts:
    """What the rules look at, from the study's instances (``Instance.attributes`` + calling AE)."""

    calling_ae_title: str | None = None
    modality: str | None = None
    body_part: str | None = None
    station: str | None = None
    institution: str | None = None
    study_description: str | None = None
    patient_age_years: float | None = None
    store_priority: str | None = None  # LOW, MEDIUM, HIGH
    stat: bool = False


@dataclass(frozen=True)
class Decision:
    """The outcome: the rule that decided (None: no rule matched), report or skip, priority, notes."""

    rule: str | None
    action: Literal["report", "skip"]
    priority: Priority
    reason: str | None = None
    notes: tuple[str, ...] = ()
    why: tuple[str, ...] = field(default=(), compare=False)  # one line per test of the deciding rule

    @property
    def skipped(self) -> bool:
        return self.action == "skip"

    def as_json(self) -> dict[str, Any]:
        """What the registry keeps (``Study.routing``)."""
        return {
            "rule": self.rule,
            "action": self.action,
            "priority": self.priority.value,
            "reason": self.reason,
            "notes": list(self.notes),
        }


def _matches_any(value: str | None, patterns: Iterable[str]) -> bool:
    if not value:
        return False
    value = value.strip().upper()
    return any(fnmatch.fnmatchcase(value, p.strip().upper()) for p in patterns)


def _tests(match: RuleMatch, facts: StudyFacts) -> list[tuple[bool, str]]:
    """(passed, explanation) for each test the rule makes."""
    out: list[tuple[bool, str]] = []
    text_tests = (
        ("calling AE title", match.calling_ae_titles, facts.calling_ae_title),
        ("modality", match.modalities, facts.modality),
        ("body part", match.body_parts, facts.body_part),
        ("station", match.stations, facts.station),
        ("institution", match.institutions, facts.institution),
        ("study description", match.study_descriptions, facts.study_description),
    )
    for label, patterns, value in text_tests:
        if patterns is not None:
            shown = "unknown" if not value else repr(value)
            out.append((_matches_any(value, patterns), f"{label} {shown} in {patterns}"))
    age = facts.patient_age_years
    shown_age = "unknown" if age is None else f"{age:g}"
    if match.patient_age_below is not None:
        out.append(
            (
                age is not None and age < match.patient_age_below,
                f"patient age {shown_age} below {match.patient_age_below:g}",
            )
        )
    if match.patient_age_at_least is not None:
        out.append(
            (
                age is not None and age >= match.patient_age_at_least,
                f"patient age {shown_age} at least {match.patient_age_at_least:g}",
            )
        )
    if match.store_priorities is not None:
        out.append(
            (
                facts.store_priority in match.store_priorities,
                f"C-STORE priority {facts.store_priority or 'unknown'} in {match.store_priorities}",
            )
        )
    if match.stat is not None:
        out.append(
            (
                facts.stat == match.stat,
                (
                    f"STAT marker {'present' if facts.stat else 'absent'}"
                    f" (rule wants {'present' if match.stat else 'absent'})"
                ),
            )
        )
    return out


def evaluate(facts: StudyFacts, rules: Sequence[RoutingRule]) -> Decision:
    """The first rule that fits decides; none fits: report at ROUTINE."""
    notes = (AGE_UNKNOWN_NOTE,) if facts.patient_age_years is None else ()
    for rule in rules:
        tests = _tests(rule.match, facts)
        if all(passed for passed, _ in tests):
            why = tuple(text for _, text in tests) or ("the rule matches every study",)
            if rule.action == "skip":
                return Decision(rule.name, "skip", rule.priority, rule.reason, notes, why)
            return Decision(rule.name, "report", rule.priority, None, notes, why)
    return Decision(None, "report", Priority.ROUTINE, None, notes, ("no rule matched",))


def explain(facts: StudyFacts, rules: Sequence[RoutingRule]) -> list[str]:
    """Every rule in order with each of its tests, for ``radialog rules test``."""
    lines = []
    for rule in rules:
        tests = _tests(rule.match, facts)
        verdict = "matches" if all(p for p, _ in tests) else "does not match"
        lines.append(f"rule {rule.name!r} ({rule.action}, {rule.priority.value}): {verdict}")
        lines.extend(f"  {'yes' if passed else 'no '} {text}" for passed, text in tests)
        if verdict == "matches":
            break
    return lines


# -- facts from headers ------------------------------------------------------------------------------------
def age_in_years(patient_age: str | None, birth_date: str | None, study_date: str | None) -> float | None:
    """Patient Age (AS: 045Y, 006M, 010W, 003D), else Birth Date -> Study Date (DA); None when unknown."""
    if patient_age:
        text = patient_age.strip().upper()
        found = re.fullmatch(r"(\d{1,3})\s*([DWMY])", text)
        if found:
            number = int(found.group(1))
            per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[found.group(2)]
            return round(number / per_year, 2)
    born, on = _date(birth_date), _date(study_date)
    if born is None or on is None or on < born:
        return None
    # completed years, as the law counts them (a 29 February birthday is passed on 1 March)
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return float(years) if years >= 1 else round((on - born).days / 365.25, 2)


def _date(value: str | None) -> date | None:
    if not value or not re.fullmatch(r"\d{8}", value.strip()):
        return None
    text = value.strip()
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def is_stat(requested_priority: str | None, reason: str | None) -> bool:
    """A STAT order: Requested Procedure Priority STAT/HIGH, or the word STAT in the reason for the request."""
    if requested_priority and requested_priority.strip().upper() in STAT_PRIORITIES:
        return True
    return bool(reason and _STAT_WORD.search(reason))


_STORE_ORDER = {"HIGH": 0, "MEDIUM": 1, "LOW": 2}


def facts_of(
    instances: Sequence[tuple[str | None, Mapping[str, Any]]],
    selected: tuple[str | None, Mapping[str, Any]] | None = None,
) -> StudyFacts:
    """Study facts from ``(calling AE, Instance.attributes)`` pairs; the chosen image's header speaks for
    the study, the most urgent C-STORE priority and any STAT marker of any instance count."""
    if not instances and selected is None:
        return StudyFacts()
    calling, a = selected if selected is not None else instances[0]
    store = [str(attrs.get("store_priority")) for _, attrs in instances if attrs.get("store_priority")]
    stat = any(bool(attrs.get("stat")) for _, attrs in instances) or bool(a.get("stat"))
    return StudyFacts(
        calling_ae_title=calling,
        modality=a.get("modality"),
        body_part=a.get("body_part_examined"),
        station=a.get("station_name"),
        institution=a.get("institution_name"),
        study_description=a.get("study_description"),
        patient_age_years=a.get("patient_age_years"),
        store_priority=min(store, key=lambda s: _STORE_ORDER.get(s, 1)) if store else None,
        stat=stat,
    )
