"""Routing rules (radialog/routing.py): the defaults (adults only, HIGH for a C-STORE HIGH or a STAT order),
facts read from real headers, validation at start with the field named, and ``radialog rules test``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from pydicom.dataset import Dataset

from composition.cli import main
from dicom_node.header import header_of
from radialog.routing import (
    AGE_UNKNOWN_NOTE,
    PEDIATRIC_REASON,
    Priority,
    RoutingRule,
    StudyFacts,
    age_in_years,
    default_rules,
    evaluate,
    facts_of,
)
from radialog.settings import Settings
from radialog.synthetic import make_cxr


def _facts(ds: Dataset, calling: str | None = "MODALITY", store_priority: str = "MEDIUM") -> StudyFacts:
    attributes = {**header_of(ds).attributes, "store_priority": store_priority}
    return facts_of([(calling, attributes)])


def test_adult_is_routine_and_no_note() -> None:
    decision = evaluate(_facts(make_cxr()), default_rules())  # born 1960
    assert (decision.action, decision.priority, decision.rule, decision.notes) == (
        "report",
        Priority.ROUTINE,
        "routine",
        (),
    )


@pytest.mark.parametrize(("age", "birth"), [("010Y", None), ("017Y", None), ("006M", None), (None, "20150101")])
def test_child_is_skipped_with_the_reason(age: str | None, birth: str | None) -> None:
    ds = make_cxr()
    ds.StudyDate = "20260101"
    if age:
        ds.PatientAge = age
    ds.PatientBirthDate = birth or ""
    decision = evaluate(_facts(ds), default_rules())
    assert decision.skipped and decision.reason == PEDIATRIC_REASON and decision.rule == "under-18"


def test_eighteen_is_an_adult_and_age_wins_over_birth_date() -> None:
    ds = make_cxr()
    ds.PatientAge = "018Y"
    ds.PatientBirthDate = "20200101"  # contradicts the age: the modality's Patient Age is what it measured
    ds.StudyDate = "20260101"
    assert not evaluate(_facts(ds), default_rules()).skipped


def test_unknown_age_is_reported_and_said() -> None:
    ds = make_cxr()
    ds.PatientBirthDate = ""
    ds.PatientAge = "garbage"
    decision = evaluate(_facts(ds), default_rules())
    assert decision.action == "report" and decision.notes == (AGE_UNKNOWN_NOTE,)


def test_store_priority_high_and_stat_orders_are_high() -> None:
    assert evaluate(_facts(make_cxr(), store_priority="HIGH"), default_rules()).priority is Priority.HIGH
    ds = make_cxr()
    item = Dataset()
    item.RequestedProcedurePriority = "STAT"
    ds.RequestAttributesSequence = [item]
    decision = evaluate(_facts(ds), default_rules())
    assert (decision.priority, decision.rule) == (Priority.HIGH, "stat-order")
    ds = make_cxr()
    ds.ReasonForTheRequestedProcedure = "ED stat: suspected pneumothorax"
    assert evaluate(_facts(ds), default_rules()).priority is Priority.HIGH
    ds.ReasonForTheRequestedProcedure = "status post surgery"  # "stat" only as a word
    assert evaluate(_facts(ds), default_rules()).priority is Priority.ROUTINE


def test_a_child_stays_skipped_even_when_stat() -> None:
    ds = make_cxr()
    ds.PatientAge = "004Y"
    assert evaluate(_facts(ds, store_priority="HIGH"), default_rules()).skipped


def test_custom_rules_by_ae_station_institution_description() -> None:
    rules = [
        RoutingRule(
            name="ed", match={"calling_ae_titles": ["ED_*"], "institutions": ["*general*"]}, priority=Priority.HIGH
        ),
        RoutingRule(
            name="research",
            match={"study_descriptions": ["*RESEARCH*"]},
            action="skip",
            reason="research studies are not pre-read",
        ),
        RoutingRule(name="night-station", match={"stations": ["NIGHT1"], "modalities": ["DX"]}, priority="LOW"),
    ]
    ds = make_cxr(modality="DX")
    ds.InstitutionName = "City General Hospital"
    ds.StationName = "night1"
    assert evaluate(_facts(ds, calling="ED_ROUTER"), rules).rule == "ed"
    assert evaluate(_facts(ds, calling="OTHER"), rules).priority is Priority.LOW
    ds.StudyDescription = "Chest research protocol"
    assert evaluate(_facts(ds, calling="OTHER"), rules).reason == "research studies are not pre-read"
    plain = make_cxr(modality="CR")
    decision = evaluate(_facts(plain, calling="OTHER"), rules)
    assert (decision.rule, decision.priority) == (None, Priority.ROUTINE)


def test_age_forms() -> None:
    assert age_in_years("045Y", None, None) == 45
    assert age_in_years("003D", None, None) == pytest.approx(0.01)
    assert age_in_years(None, "20000229", "20180228") < 18 <= age_in_years(None, "20000229", "20180301")
    assert age_in_years(None, "20300101", "20260101") is None  # born after the study: unknown, not negative
    assert age_in_years(None, "2000", "20260101") is None


def test_rules_are_validated_at_start_with_the_field_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RADIALOG_ROUTING_RULES", json.dumps([{"name": "x", "action": "skip"}]))
    with pytest.raises(ValidationError, match="needs a reason"):
        Settings()
    monkeypatch.setenv("RADIALOG_ROUTING_RULES", json.dumps([{"name": "x", "match": {"modality": ["CR"]}}]))
    with pytest.raises(ValidationError, match=r"routing_rules\.0\.match\.modality"):
        Settings()
    monkeypatch.setenv("RADIALOG_ROUTING_RULES", json.dumps([{"name": "x"}, {"name": "x"}]))
    with pytest.raises(ValidationError, match="used twice"):
        Settings()
    monkeypatch.delenv("RADIALOG_ROUTING_RULES")
    config = tmp_path / "radialog.toml"
    config.write_text(
        '[[routing_rules]]\nname = "ed"\npriority = "HIGH"\n'
        '[routing_rules.match]\ncalling_ae_titles = ["ED"]\n'
        '[[routing_rules]]\nname = "rest"\n'
    )
    monkeypatch.setenv("RADIALOG_CONFIG", str(config))
    assert [r.name for r in Settings().routing_rules] == ["ed", "rest"]
    config.write_text('[[routing_rules]]\nname = "ed"\npriority = "URGENT"\n')
    with pytest.raises(ValidationError, match=r"routing_rules\.0\.priority"):
        Settings()


def test_rules_test_command_says_which_rule_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radialog.settings import get_settings

    get_settings.cache_clear()
    monkeypatch.delenv("RADIALOG_ROUTING_RULES", raising=False)
    monkeypatch.delenv("RADIALOG_CONFIG", raising=False)
    child = make_cxr()
    child.PatientAge = "007Y"
    path = tmp_path / "child.dcm"
    child.save_as(path, enforce_file_format=True)
    result = CliRunner().invoke(main, ["rules", "test", str(path)])
    assert result.exit_code == 0, result.output
    assert f"result: SKIPPED by rule 'under-18': {PEDIATRIC_REASON}" in result.output
    assert "yes patient age 7 below 18" in result.output

    adult = make_cxr()
    adult.PatientBirthDate = ""
    path = tmp_path / "adult.dcm"
    adult.save_as(path, enforce_file_format=True)
    result = CliRunner().invoke(main, ["rules", "test", str(path), "--store-priority", "HIGH"])
    assert "result: reported at priority HIGH (rule 'store-priority-high')" in result.output
    assert f"note: {AGE_UNKNOWN_NOTE}" in result.output

    knee = make_cxr(body_part="KNEE")
    path = tmp_path / "knee.dcm"
    knee.save_as(path, enforce_file_format=True)
    result = CliRunner().invoke(main, ["rules", "test", str(path)])
    assert "SKIPPED before the rules: no chest image: body part KNEE" in result.output
    get_settings.cache_clear()
