"""The operations page and the approval checklist in headless Chromium against the real API (uvicorn in a
thread) and Redis: an admin sees every chart with the API's values; a radiologist signs with a verdict on
each AI finding, prefilled only where the text says so, and the verdicts stored are the ones on screen.

Screenshots: test-artifacts/ops.png, test-artifacts/page-checklist.png.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from radialog.presence import ready_key
from radialog.registry import ApprovalReview, Export, FindingVerdict, Registry, Report, StudyState, utcnow
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.seeding import add_reported_study, add_study, make_keys
from tests.test_page import ARTIFACTS, api_server, give_verdicts, signed_in

EFFUSION = "Pleural Effusion"


@pytest.fixture
def page_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"broker_url": redis_url(__name__)})


def test_checklist_prefills_from_the_text_and_the_stored_verdicts_are_those_on_screen(
    page_settings: Settings, sqlite_registry: Registry
) -> None:
    from playwright.sync_api import expect

    keys = make_keys(sqlite_registry)
    study = add_reported_study(
        sqlite_registry,
        page_settings,
        findings_text="Small left pleural effusion. No pneumothorax.",
        present=(EFFUSION, "Pneumothorax"),
    )
    with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["rad"]) as page:
        page.locator(f'#worklist tr[data-study-id="{study}"]').click()
        rows = page.locator("#checklist tbody tr")
        expect(rows).to_have_count(14)
        effusion = page.locator(f'#checklist tr[data-label="{EFFUSION}"]')
        expect(effusion.locator("button.agree")).to_have_attribute("aria-pressed", "true")
        expect(effusion).to_contain_text("from the text: present")
        pneumothorax = page.locator('#checklist tr[data-label="Pneumothorax"]')
        expect(pneumothorax.locator("button.disagree")).to_have_attribute("aria-pressed", "true")
        expect(pneumothorax).to_contain_text("No pneumothorax")
        edema = page.locator('#checklist tr[data-label="Edema"]')
        expect(edema).to_have_class("open")  # not named in the text: nothing chosen for the radiologist
        expect(edema.locator("button[aria-pressed=true]")).to_have_count(0)
        expect(page.locator("#approve")).to_be_disabled()
        expect(page.locator("#approve-note")).to_contain_text("verdict on each AI finding")
        edema.locator("button.disagree").click()  # the radiologist sees edema the AI missed
        expect(page.locator("#approve")).to_be_disabled()  # eleven still open
        give_verdicts(page)
        expect(page.locator("#checklist tr.open")).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "page-checklist.png"), full_page=True)
        page.click("#approve")
        expect(page.locator("#report-banner")).to_have_text("Verified by rad — version 2")
        expect(page.locator("#checklist-box")).to_be_hidden()  # nothing left to sign
    with sqlite_registry.session() as s:
        review = s.scalars(select(ApprovalReview)).one()
        approval = s.get(Report, review.report_id)
        assert approval is not None and approval.verified and approval.version == 2
        verdicts = {v.label: v for v in s.scalars(select(FindingVerdict))}
    assert len(verdicts) == 14
    assert (verdicts[EFFUSION].agree, verdicts[EFFUSION].suggested) == (True, "agree")
    assert (verdicts["Pneumothorax"].agree, verdicts["Pneumothorax"].radiologist_present) == (False, False)
    assert (verdicts["Edema"].agree, verdicts["Edema"].radiologist_present, verdicts["Edema"].suggested) == (
        False,
        True,
        None,
    )
    assert all(v.agree for label, v in verdicts.items() if label not in {"Pneumothorax", "Edema"})


def test_a_model_without_classifier_is_signed_on_its_text(page_settings: Settings, sqlite_registry: Registry) -> None:
    from playwright.sync_api import expect

    from radialog.model_output import Provenance, ReportOutput
    from reporting.versions import create_ai_draft

    keys = make_keys(sqlite_registry)
    study, _ = add_study(sqlite_registry, page_settings, state=StudyState.RUNNING)
    output = ReportOutput(
        key="x", findings_text="The lungs are clear.", findings=[], findings_phrase="", generated_tokens=5, timings={}
    )
    with sqlite_registry.session() as s:
        create_ai_draft(s, page_settings, study, output, Provenance("XrayGPT", "1.0-test", "1" * 64, tiny=True))
    with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["rad"]) as page:
        page.locator(f'#worklist tr[data-study-id="{study}"]').click()
        expect(page.locator("#checklist-note")).to_contain_text("no classifier findings")
        page.click("#approve")
        expect(page.locator("#report-banner")).to_have_text("Verified by rad — version 2")
    with sqlite_registry.session() as s:
        review = s.scalars(select(ApprovalReview)).one()
        assert review.model_name == "XrayGPT" and not review.checklist


def check_ops_page(page: Any, base: str, admin_key: str, screenshot: str) -> dict[str, Any]:
    """Open the operations page as the signed-in admin and compare every chart with the API's figures;
    returns them."""
    from playwright.sync_api import expect

    page.click("#nav-ops")
    expect(page.locator("#ops")).to_be_visible()
    expect(page.locator("#chart-findings svg")).to_have_count(1)
    headers = {"Authorization": f"Bearer {admin_key}"}
    overview = httpx.get(f"{base}/api/v1/operations/overview", params={"hours": 24}, headers=headers).json()
    agreement = httpx.get(f"{base}/api/v1/quality/agreement", headers=headers).json()
    # studies per hour by state: every segment is the API's count for that hour and state
    expected = {(h["hour"], s): n for h in overview["studies_per_hour"] for s, n in h["counts"].items()}
    segments = page.locator("#chart-studies rect.seg")
    expect(segments).to_have_count(len(expected))
    shown = {
        (r["hour"], r["state"]): int(r["value"])
        for r in segments.evaluate_all(
            "rs => rs.map(r => ({hour: r.dataset.hour, state: r.dataset.state, value: r.dataset.value}))"
        )
    }
    assert {(_iso(h), s): n for (h, s), n in shown.items()} == {(_iso(h), s): n for (h, s), n in expected.items()}
    for state in overview["states"]:
        total = sum(h["counts"].get(state, 0) for h in overview["studies_per_hour"])
        expect(page.locator(f'#chart-studies text.legend[data-state="{state}"]')).to_have_text(f"{state} {total}")
    # latency percentiles
    for series in ("image_to_sr", "image_to_pacs"):
        for mark in ("p50", "p95", "max"):
            value = overview["latency"][series][mark]
            rect = page.locator(f'#chart-latency rect[data-series="{series}"][data-mark="{mark}"]')
            assert (rect.get_attribute("data-value") or None) == (None if value is None else _js_number(value))
    # queues, workers, reasons, outbox
    for queue, depth in overview["queues"]["depths"].items():
        assert page.locator(f'#chart-queues rect[data-queue="{queue}"]').get_attribute("data-value") == str(depth)
    for worker in overview["workers"]["ready"]:
        for kind, slots in worker["slots"].items():
            rect = page.locator(f'#chart-workers rect[data-worker="{worker["name"]}"][data-kind="{kind}"]')
            assert rect.get_attribute("data-value") == str(slots)
    if not overview["workers"]["ready"]:
        expect(page.locator("#chart-workers")).to_contain_text("No worker ready")
    for row in overview["not_reported"]:
        values = page.locator(f'#chart-reasons rect[data-kind="study"][data-state="{row["state"]}"]').evaluate_all(
            "rs => rs.map(r => [r.dataset.reason, r.dataset.value])"
        )
        assert [row["reason"], str(row["count"])] in values
    for row in overview["dead_exports"]:
        values = page.locator('#chart-reasons rect[data-kind="export"]').evaluate_all(
            "rs => rs.map(r => [r.dataset.destination, r.dataset.reason, r.dataset.value])"
        )
        assert [row["destination"], row["reason"], str(row["count"])] in values
    e = overview["exports"]
    expect(page.locator("#chart-reasons text[data-outbox]")).to_have_text(
        f"outbox: {e['PENDING']} pending · {e['SENT']} sent · {e['DEAD']} dead"
    )
    # drafts unchanged vs edited, agreement over time, per-finding accuracy
    drafts = agreement["drafts"]
    assert page.locator("#chart-drafts rect.unchanged").get_attribute("data-value") == str(drafts["unchanged"])
    assert page.locator("#chart-drafts rect.edited").get_attribute("data-value") == str(drafts["edited"])
    expect(page.locator("#chart-drafts text[data-approved]")).to_contain_text(
        f"{drafts['unchanged']} unchanged · {drafts['edited']} edited of {drafts['approved']}"
    )
    cells = {
        (c["label"], c["period"]): (int(c["agree"]), int(c["n"]))
        for c in page.locator("#chart-agreement rect.cell").evaluate_all(
            "cs => cs.map(c => ({label: c.dataset.label, period: c.dataset.period, agree: c.dataset.agree, n: c.dataset.n}))"
        )
    }
    assert cells == {
        (label, t["period"]): (cell["agree"], cell["n"])
        for t in agreement["timeline"]
        for label, cell in t["findings"].items()
    }
    for finding in agreement["findings"]:
        for measure in ("sensitivity", "specificity", "ppv"):
            p = finding[measure]
            point = page.locator(f'#chart-findings circle[data-label="{finding["label"]}"][data-measure="{measure}"]')
            if p["value"] is None:
                expect(point).to_have_count(0)
                continue
            assert float(point.get_attribute("data-value")) == p["value"]
            assert [float(point.get_attribute("data-low")), float(point.get_attribute("data-high"))] == p["ci95"]
            text = page.locator(f'#chart-findings text[data-label="{finding["label"]}"][data-measure="{measure}"]')
            expect(text).to_have_text(f"{p['value']:.2f} ({p['ci95'][0]:.2f}–{p['ci95'][1]:.2f}) {p['k']}/{p['n']}")
    page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
    return {"overview": overview, "agreement": agreement}


def _iso(value: str) -> str:
    from datetime import datetime

    return datetime.fromisoformat(value).isoformat()


def _js_number(value: float) -> str:
    """How JavaScript writes a number into an attribute (String(n))."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def test_operations_page_draws_the_apis_figures(page_settings: Settings, sqlite_registry: Registry) -> None:
    """Seeded: reported, skipped and failed studies, a DEAD export, approvals with verdicts, a worker key."""
    import json

    import redis
    from fastapi.testclient import TestClient
    from playwright.sync_api import expect

    from api.app import create_app

    keys = make_keys(sqlite_registry)
    reported = [
        add_reported_study(sqlite_registry, page_settings, index=i, present=(EFFUSION,) if i % 2 == 0 else ())
        for i in range(4)
    ]
    add_study(sqlite_registry, page_settings, state=StudyState.SKIPPED, index=8, reason="lateral view only")
    add_study(
        sqlite_registry, page_settings, state=StudyState.FAILED, index=9, reason="unreadable pixels: JPEG 2000 decoder"
    )
    with sqlite_registry.session() as s:
        draft = s.scalars(select(Report).where(Report.study_id == reported[0])).one()
        s.add(
            Export(
                report_id=draft.id,
                destination="pacs",
                state="DEAD",
                attempts=40,
                last_error="C-STORE refused: 0xA700",
                created_at=utcnow(),
            )
        )
        s.commit()
    client = TestClient(create_app(page_settings, sqlite_registry))
    rad = {"Authorization": f"Bearer {keys['rad']}"}
    for i, study in enumerate(reported[:3]):  # three approvals: agree, then a disagreement, one edited
        if i == 2:
            assert (
                client.post(
                    f"/api/v1/studies/{study}/report/versions",
                    headers=rad,
                    json={"kind": "edit", "findings_text": "Heart normal. Lungs clear.", "base_version": 1},
                ).status_code
                == 201
            )
        items = client.get(f"/api/v1/studies/{study}/report/checklist", headers=rad).json()["items"]
        verdicts = [
            {
                "label": it["label"],
                "ai_present": it["ai_present"],
                "verdict": "disagree" if (i == 1 and it["label"] == "Cardiomegaly") else "agree",
            }
            for it in items
        ]
        current = client.get(f"/api/v1/studies/{study}/report", headers=rad).json()
        assert (
            client.post(
                f"/api/v1/studies/{study}/report/approve",
                headers=rad,
                json={
                    "base_version": current["version"],
                    "findings_text": current["findings_text"],
                    "checklist": verdicts,
                },
            ).status_code
            == 201
        )
    broker = redis.Redis.from_url(page_settings.broker_url)
    worker_key = ready_key("ops-test@host")
    broker.set(
        worker_key,
        json.dumps(
            {
                "name": "RaDialog-LLaVA",
                "version": "2.0",
                "device": "cuda:0",
                "tiny": False,
                "engine": {"report": {"slots": 64}, "dialog": {"slots": 4}},
            }
        ),
        ex=120,
    )
    try:
        with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["admin"]) as page:
            expect(page.locator("#nav")).to_be_visible()
            figures = check_ops_page(page, base, keys["admin"], "ops.png")
    finally:
        broker.delete(worker_key)
        broker.close()
    assert figures["agreement"]["drafts"]["approved"] == 3 and figures["overview"]["exports"]["DEAD"] == 1
    assert any(w["slots"] == {"report": 64, "dialog": 4} for w in figures["overview"]["workers"]["ready"])


def test_operations_page_is_for_admins_only(page_settings: Settings, sqlite_registry: Registry) -> None:
    from playwright.sync_api import expect

    keys = make_keys(sqlite_registry)
    with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["rad"]) as page:
        expect(page.locator("#nav")).to_be_hidden()
        expect(page.locator("#ops")).to_be_hidden()
