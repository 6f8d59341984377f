"""Agreement data: the approval checklist (what the text says, checked, stored with the approval) and the
figures of GET /quality/agreement against values computed by hand, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from radialog.registry import ApprovalReview, FindingVerdict, Registry, Report, StudyState
from radialog.settings import Settings
from reporting.agreement import edit_distance, stated
from reporting.quality import wilson
from tests.support.brokers import redis_url
from tests.support.seeding import add_reported_study, add_study, make_keys

EFFUSION = "Pleural Effusion"


# -- Wilson score intervals, by hand -------------------------------------------------------------------
# z = 1.959964, z^2 = 3.841459; centre = (p + z^2/2n) / (1 + z^2/n); half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (8, 10, 0.4902, 0.9433),  # centre 0.99207/1.38415 = 0.71674, half 0.22658
        (2, 3, 0.2077, 0.9385),  # centre 1.30691/2.28049 = 0.57309, half 0.36543
        (1, 2, 0.0945, 0.9055),  # centre 0.5, half 0.40547
        (4, 5, 0.3755, 0.9638),  # centre 1.18415/1.76829 = 0.66966, half 0.29412
        (5, 5, 0.5655, 1.0),  # centre 0.78276, half 0.21724
        (0, 5, 0.0, 0.4345),
        (1, 1, 0.2065, 1.0),
    ],
)
def test_wilson_interval_matches_hand_computed_values(k: int, n: int, low: float, high: float) -> None:
    got = wilson(k, n)
    assert got is not None and got[0] == pytest.approx(low, abs=5e-5) and got[1] == pytest.approx(high, abs=5e-5)


def test_wilson_has_no_interval_without_trials_and_refuses_nonsense() -> None:
    assert wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(3, 2)


# -- what the text says about a finding ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "label", "expected"),
    [
        ("There is a small left pleural effusion.", EFFUSION, "present"),
        ("Small bilateral pleural effusions.", EFFUSION, "present"),
        ("No pleural effusion or pneumothorax.", EFFUSION, "absent"),
        ("No pleural effusion or pneumothorax.", "Pneumothorax", "absent"),
        ("Cardiomegaly without pulmonary edema.", "Cardiomegaly", "present"),
        ("Cardiomegaly without pulmonary edema.", "Edema", "absent"),
        ("The pneumothorax has resolved.", "Pneumothorax", "absent"),
        ("Pneumothorax is not seen.", "Pneumothorax", "absent"),
        ("No change in the right pleural effusion.", EFFUSION, "present"),  # "no change": not a denial
        ("Possible pneumonia in the left lower lobe.", "Pneumonia", None),  # hedged: the radiologist decides
        ("Atelectasis cannot be excluded.", "Atelectasis", None),
        ("Heart size is normal.", "Cardiomegaly", None),  # not named in the model's phrase: nothing proposed
        ("Left pleural effusion. No right pleural effusion.", EFFUSION, None),  # named both ways
        ("No acute cardiopulmonary process.", "No Finding", None),  # the catch-all label has no phrase
    ],
)
def test_the_text_is_read_in_the_models_phrase_and_never_guessed(text: str, label: str, expected: str | None) -> None:
    says, evidence = stated(label, text)
    assert says == expected
    if expected is not None:
        assert evidence and label.lower().split()[0] in evidence.lower()


def test_edit_distance_counts_characters() -> None:
    assert edit_distance("small effusion", "small effusion") == 0
    assert edit_distance("kitten", "sitting") == 3  # k->s, e->i, + g
    assert edit_distance("small effusion", "small effusion. Stable.") == 9
    assert edit_distance("", "abc") == 3


# -- the API --------------------------------------------------------------------------------------------
@pytest.fixture
def client(registry: Registry, settings: Settings) -> Iterator[tuple[TestClient, dict[str, str], Settings]]:
    api_settings = settings.model_copy(update={"broker_url": redis_url(__name__)})
    with TestClient(create_app(api_settings, registry)) as test_client:
        yield test_client, make_keys(registry), api_settings


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _checklist(client: TestClient, key: str, study_id: int, verdicts: dict[str, str] | None = None) -> list[dict]:
    """The checklist of the current version, with the suggestion where the text gives one, else
    ``verdicts[label]`` (default: agree) - what a radiologist leaves on the page."""
    items = client.get(f"/api/v1/studies/{study_id}/report/checklist", headers=_auth(key)).json()["items"]
    verdicts = verdicts or {}
    return [
        {
            "label": i["label"],
            "ai_present": i["ai_present"],
            "verdict": verdicts.get(i["label"]) or i["suggestion"] or "agree",
        }
        for i in items
    ]


def _approve(client: TestClient, key: str, study_id: int, checklist: list[dict] | None) -> dict:
    current = client.get(f"/api/v1/studies/{study_id}/report", headers=_auth(key)).json()
    body = {"base_version": current["version"], "findings_text": current["findings_text"]}
    if checklist is not None:
        body["checklist"] = checklist
    response = client.post(f"/api/v1/studies/{study_id}/report/approve", json=body, headers=_auth(key))
    assert response.status_code == 201, response.text
    return response.json()


def _xraygpt_draft(registry: Registry, settings: Settings, index: int) -> int:
    """A draft by a model without a findings classifier (XrayGPT): text only."""
    from radialog.model_output import Provenance, ReportOutput
    from reporting.versions import create_ai_draft

    study_id, _ = add_study(registry, settings, state=StudyState.RUNNING, index=index)
    output = ReportOutput(
        key=str(study_id),
        findings_text="The lungs are clear.",
        findings=[],
        findings_phrase="",
        generated_tokens=5,
        timings={},
    )
    with registry.session() as session:
        create_ai_draft(session, settings, study_id, output, Provenance("XrayGPT", "1.0-test", "1" * 64, tiny=True))
    return study_id


def test_agreement_figures_equal_the_hand_computed_ones(client, registry: Registry) -> None:
    """Five RaDialog drafts and one XrayGPT draft, approved with known verdicts.

    Pleural Effusion: AI present in drafts 1-3, absent in 4-5; radiologist: 1 agree (TP), 2 agree (TP),
    3 disagree (FP), 4 disagree (FN), 5 agree (TN) -> TP 2, FP 1, FN 1, TN 1: sensitivity 2/3
    (0.2077-0.9385), specificity 1/2 (0.0945-0.9055), PPV 2/3. Cardiomegaly: AI absent in all five, the
    radiologist agrees -> TN 5: specificity 5/5 (0.5655-1), no sensitivity or PPV (nothing present).
    Draft 2 is edited before approval (" Stable." appended: 8 characters), the rest are signed unchanged:
    4 of 5 unchanged (0.3755-0.9638); with the XrayGPT draft, 5 of 6.
    """
    test_client, keys, settings = client
    texts = [
        "There is a small left pleural effusion.",
        "There is a small left pleural effusion.",
        "The lungs are clear.",
        "The lungs are clear.",
        "The lungs are clear.",
    ]
    studies = [
        add_reported_study(registry, settings, index=i, findings_text=text, present=(EFFUSION,) if i < 3 else ())
        for i, text in enumerate(texts)
    ]
    effusion = ["agree", "agree", "disagree", "disagree", "agree"]
    # draft 2 is edited first (a new, unverified version), then approved
    edited = test_client.post(
        f"/api/v1/studies/{studies[1]}/report/versions",
        headers=_auth(keys["rad"]),
        json={"kind": "edit", "findings_text": texts[1] + " Stable.", "base_version": 1},
    )
    assert edited.status_code == 201, edited.text
    for study_id, verdict in zip(studies, effusion, strict=True):
        checklist = _checklist(test_client, keys["rad"], study_id, {EFFUSION: verdict})
        assert len(checklist) == 14
        _approve(test_client, keys["rad"], study_id, checklist)
    xray = _xraygpt_draft(registry, settings, 9)
    assert client_checklist_is_empty(test_client, keys["rad"], xray)
    _approve(test_client, keys["rad"], xray, [])

    figures = test_client.get(
        "/api/v1/quality/agreement", params={"backend": "RaDialog-LLaVA"}, headers=_auth(keys["admin"])
    ).json()
    by_label = {f["label"]: f for f in figures["findings"]}
    e = by_label[EFFUSION]
    assert (e["n"], e["tp"], e["fp"], e["fn"], e["tn"], e["ai_present"], e["radiologist_present"]) == (
        5,
        2,
        1,
        1,
        1,
        3,
        3,
    )
    assert e["sensitivity"]["k"] == 2 and e["sensitivity"]["n"] == 3
    assert e["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert e["sensitivity"]["ci95"] == pytest.approx([0.2077, 0.9385], abs=5e-5)
    assert e["specificity"]["value"] == pytest.approx(0.5)
    assert e["specificity"]["ci95"] == pytest.approx([0.0945, 0.9055], abs=5e-5)
    assert (e["ppv"]["k"], e["ppv"]["n"]) == (2, 3) and e["ppv"]["ci95"] == pytest.approx([0.2077, 0.9385], abs=5e-5)
    assert e["agreement"]["k"] == 3 and e["agreement"]["n"] == 5
    c = by_label["Cardiomegaly"]
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (0, 0, 0, 5)
    assert c["specificity"]["ci95"] == pytest.approx([0.5655, 1.0], abs=5e-5)
    assert c["sensitivity"]["value"] is None and c["sensitivity"]["ci95"] is None and c["ppv"]["value"] is None
    drafts = figures["drafts"]
    assert (drafts["approved"], drafts["unchanged"], drafts["edited"], drafts["with_checklist"]) == (5, 4, 1, 5)
    assert drafts["share_unchanged"]["ci95"] == pytest.approx([0.3755, 0.9638], abs=5e-5)
    assert drafts["edit_distance"]["max"] == 8 and drafts["edit_distance"]["median"] == 0
    (day,) = figures["timeline"]
    assert day["drafts"] == {"approved": 5, "unchanged": 4}
    assert (day["findings"][EFFUSION]["agree"], day["findings"][EFFUSION]["n"]) == (3, 5)
    assert figures["backends"] == ["RaDialog-LLaVA", "XrayGPT"]
    assert "Wilson" in figures["method"]

    everything = test_client.get("/api/v1/quality/agreement", headers=_auth(keys["admin"])).json()
    assert (everything["drafts"]["approved"], everything["drafts"]["unchanged"]) == (6, 5)
    xrays = test_client.get(
        "/api/v1/quality/agreement", params={"backend": "xraygpt"}, headers=_auth(keys["rad"])
    ).json()
    assert xrays["drafts"]["approved"] == 1 and xrays["findings"] == [] and xrays["drafts"]["with_checklist"] == 0


def client_checklist_is_empty(test_client: TestClient, key: str, study_id: int) -> bool:
    body = test_client.get(f"/api/v1/studies/{study_id}/report/checklist", headers=_auth(key)).json()
    return body["items"] == [] and body["model_name"] == "XrayGPT" and body["draft_version"] == 1


def test_a_draft_approved_twice_counts_once_with_its_latest_approval(client, registry: Registry) -> None:
    test_client, keys, settings = client
    study = add_reported_study(registry, settings)
    _approve(test_client, keys["rad"], study, _checklist(test_client, keys["rad"], study))
    edited = test_client.post(
        f"/api/v1/studies/{study}/report/versions",
        headers=_auth(keys["rad"]),
        json={"kind": "edit", "findings_text": "There is a large left pleural effusion.", "base_version": 2},
    )
    assert edited.status_code == 201, edited.text
    _approve(test_client, keys["rad"], study, _checklist(test_client, keys["rad"], study))
    figures = test_client.get("/api/v1/quality/agreement", headers=_auth(keys["admin"])).json()
    assert (figures["drafts"]["approved"], figures["drafts"]["unchanged"], figures["drafts"]["edited"]) == (1, 0, 1)
    assert {f["label"]: f["n"] for f in figures["findings"]}[EFFUSION] == 1
    with registry.session() as session:
        assert session.scalar(select(func.count()).select_from(ApprovalReview)) == 2  # both kept


def test_the_checklist_is_checked_before_anything_is_written(client, registry: Registry) -> None:
    """Incomplete (422) or showing other AI calls than the draft's (409): no version, no SR file, no review."""
    test_client, keys, settings = client
    study = add_reported_study(registry, settings)
    full = _checklist(test_client, keys["rad"], study)
    current = test_client.get(f"/api/v1/studies/{study}/report", headers=_auth(keys["rad"])).json()
    base = {"base_version": 1, "findings_text": current["findings_text"]}
    srs_before = sorted(settings.sr_dir.rglob("*.dcm"))

    def approve(checklist: list[dict]) -> int:
        return test_client.post(
            f"/api/v1/studies/{study}/report/approve", headers=_auth(keys["rad"]), json={**base, "checklist": checklist}
        ).status_code

    assert approve(full[:-1]) == 422  # a finding left out
    assert approve(full + [full[0]]) == 422  # a finding twice
    assert approve(full + [{"label": "Dragons", "ai_present": False, "verdict": "agree"}]) == 422
    flipped = [dict(v, ai_present=not v["ai_present"]) if v["label"] == EFFUSION else v for v in full]
    assert approve(flipped) == 409  # judged another AI call than the draft's
    with registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Report).where(Report.study_id == study)) == 1
        assert session.scalar(select(func.count()).select_from(ApprovalReview)) == 0
    assert sorted(settings.sr_dir.rglob("*.dcm")) == srs_before
    assert approve(full) == 201


def test_verdicts_are_stored_with_the_approval_and_what_was_suggested(client, registry: Registry) -> None:
    test_client, keys, settings = client
    study = add_reported_study(
        registry,
        settings,
        findings_text="Small left pleural effusion. No pneumothorax.",
        present=(EFFUSION, "Pneumothorax"),
    )
    items = {
        i["label"]: i
        for i in test_client.get(f"/api/v1/studies/{study}/report/checklist", headers=_auth(keys["rad"])).json()[
            "items"
        ]
    }
    assert (items[EFFUSION]["stated"], items[EFFUSION]["suggestion"]) == ("present", "agree")
    assert (items["Pneumothorax"]["stated"], items["Pneumothorax"]["suggestion"]) == ("absent", "disagree")
    assert items["Pneumothorax"]["evidence"] == "No pneumothorax"
    assert items["Edema"]["suggestion"] is None  # not named: left to the radiologist
    approval = _approve(
        test_client, keys["rad"], study, _checklist(test_client, keys["rad"], study, {"Edema": "disagree"})
    )
    with registry.session() as session:
        review = session.scalars(select(ApprovalReview)).one()
        assert review.report_id == approval["id"] and review.checklist and review.edit_distance == 0
        verdicts = {
            v.label: v for v in session.scalars(select(FindingVerdict).where(FindingVerdict.review_id == review.id))
        }
        assert len(verdicts) == 14
        assert verdicts["Pneumothorax"].ai_present and not verdicts["Pneumothorax"].radiologist_present
        assert verdicts["Pneumothorax"].suggested == "disagree" and not verdicts["Pneumothorax"].agree
        assert not verdicts["Edema"].ai_present and verdicts["Edema"].radiologist_present  # a miss of the AI
        assert verdicts["Edema"].suggested is None


def test_an_approval_without_checklist_still_records_the_edit_distance(client, registry: Registry) -> None:
    test_client, keys, settings = client
    study = add_reported_study(registry, settings)
    _approve(test_client, keys["rad"], study, None)
    with registry.session() as session:
        review = session.scalars(select(ApprovalReview)).one()
        assert not review.checklist and review.edit_distance == 0
        assert session.scalar(select(func.count()).select_from(FindingVerdict)) == 0


def test_agreement_bounds_the_period_and_refuses_other_roles(client, registry: Registry) -> None:
    """At most 366 days back from 'to' (said in the body); 'from' after 'to' is an empty period."""
    test_client, keys, settings = client
    assert test_client.get("/api/v1/quality/agreement", headers=_auth(keys["reader"])).status_code == 403
    study = add_reported_study(registry, settings)
    _approve(test_client, keys["rad"], study, None)
    backwards = test_client.get(
        "/api/v1/quality/agreement",
        params={"from": "2999-02-01T00:00:00Z", "to": "2000-01-01T00:00:00Z"},
        headers=_auth(keys["admin"]),
    )
    assert backwards.status_code == 200 and backwards.json()["from"] == backwards.json()["to"]
    assert backwards.json()["drafts"]["approved"] == 0
    long = test_client.get(
        "/api/v1/quality/agreement",
        params={"from": "0001-01-01T00:00:00Z", "to": "9999-01-01T00:00:00Z"},
        headers=_auth(keys["admin"]),
    ).json()
    assert long["from"] == "9997-12-31T00:00:00Z" and long["drafts"]["approved"] == 0  # 366 days before 'to' only
    recent = test_client.get(
        "/api/v1/quality/agreement", params={"from": "2000-01-01T00:00:00Z"}, headers=_auth(keys["admin"])
    ).json()
    assert recent["drafts"]["approved"] == 1  # within 366 days of now


def test_operations_overview_counts_what_the_registry_holds(client, registry: Registry, tmp_path: Path) -> None:
    """Admins only; studies per hour by state, latency percentiles, reasons, the outbox."""
    from radialog.registry import Export, utcnow

    test_client, keys, settings = client
    reported = [add_reported_study(registry, settings, index=i) for i in range(3)]
    add_study(registry, settings, state=StudyState.SKIPPED, index=7, reason="lateral view only")
    add_study(registry, settings, state=StudyState.FAILED, index=8, reason="unreadable pixels")
    with registry.session() as session:
        draft = session.scalars(select(Report).where(Report.study_id == reported[0])).one()
        session.add(
            Export(
                report_id=draft.id,
                destination="pacs",
                state="DEAD",
                attempts=40,
                last_error="association rejected",
                created_at=utcnow(),
            )
        )
        session.commit()
    assert test_client.get("/api/v1/operations/overview", headers=_auth(keys["rad"])).status_code == 403
    body = test_client.get("/api/v1/operations/overview", params={"hours": 2}, headers=_auth(keys["admin"])).json()
    assert len(body["studies_per_hour"]) == 2
    total: dict[str, int] = {}
    for hour in body["studies_per_hour"]:
        for state, count in hour["counts"].items():
            total[state] = total.get(state, 0) + count
    assert total == {"REPORTED": 3, "SKIPPED": 1, "FAILED": 1}
    assert body["latency"]["image_to_sr"]["n"] == 3 and body["latency"]["image_to_sr"]["p50"] >= 0
    assert body["latency"]["image_to_pacs"]["n"] == 0
    assert {(r["state"], r["reason"], r["count"]) for r in body["not_reported"]} == {
        ("SKIPPED", "lateral view only", 1),
        ("FAILED", "unreadable pixels", 1),
    }
    assert body["exports"]["DEAD"] == 1
    assert body["dead_exports"] == [{"destination": "pacs", "reason": "association rejected", "count": 1}]
    assert body["queues"]["available"] and set(body["queues"]["depths"]) == {"dialog", "export", "report"}
    assert body["workers"] == {"available": True, "ready": [], "error": None}
