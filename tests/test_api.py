"""The reporting API against the real registry (SQLite and PostgreSQL) and the real Redis.

Reports are made by reporting.versions (the call the workers make); nothing answers in place of the API.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from radialog.presence import ready_key
from radialog.registry import AuditEntry, Conversation, DialogTurn, Registry, StudyState
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.seeding import add_reported_study, add_study, make_keys

REDIS_URL = redis_url(__name__)


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"broker_url": REDIS_URL})


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(ready_key("*")):
        client.delete(key)
    yield client
    client.close()


@pytest.fixture
def client(registry: Registry, api_settings: Settings, redis_db: redis.Redis) -> Iterator[TestClient]:
    app = create_app(api_settings, registry)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def keys(registry: Registry) -> dict[str, str]:
    return make_keys(registry)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_problem(response, status: int, slug: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and "type" in body and "detail" in body
    if slug:
        assert body["type"].endswith("/" + slug), body["type"]
    return body


def audit_actions(registry: Registry, study_id: int | None = None) -> list[tuple[str, str]]:
    with registry.session() as s:
        q = select(AuditEntry).order_by(AuditEntry.id)
        if study_id is not None:
            q = q.where(AuditEntry.study_id == study_id)
        return [(e.actor, e.action) for e in s.scalars(q)]


# -- auth ------------------------------------------------------------------------------------------


def test_no_key_unknown_key_and_revoked_key_are_401(
    client: TestClient, keys: dict[str, str], registry: Registry
) -> None:
    body = assert_problem(client.get("/api/v1/studies"), 401, "unauthenticated")
    assert "API key" in body["detail"]
    assert client.get("/api/v1/studies").headers["www-authenticate"] == "Bearer"
    assert_problem(client.get("/api/v1/studies", headers=auth("rdl_not-a-key")), 401)
    assert client.get("/api/v1/studies", headers={"X-API-Key": keys["reader"]}).status_code == 200
    from api.users import revoke_user

    with registry.session() as s:
        assert revoke_user(s, "reader")
    assert_problem(client.get("/api/v1/studies", headers=auth(keys["reader"])), 401)


def test_keys_are_stored_hashed(registry: Registry, keys: dict[str, str]) -> None:
    from radialog.registry import ApiKey

    with registry.session() as s:
        stored = {k.name: k.key_hash for k in s.scalars(select(ApiKey))}
    assert set(stored) == {"reader", "rad", "admin"}
    assert not any(key in stored.values() for key in keys.values())


# -- studies ---------------------------------------------------------------------------------------


def test_worklist_filters_and_paging(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    ids = [
        add_study(registry, api_settings, state=StudyState.QUEUED, index=i, study_date=f"2026010{i + 1}")[0]
        for i in range(3)
    ]
    failed, _ = add_study(
        registry, api_settings, state=StudyState.FAILED, index=7, reason="pixel data unreadable", study_date="20260301"
    )
    h = auth(keys["reader"])
    page = client.get("/api/v1/studies", headers=h).json()
    assert page["total"] == 4 and [s["id"] for s in page["items"]] == [failed, *reversed(ids)]
    page = client.get("/api/v1/studies", params={"limit": 2, "offset": 1}, headers=h).json()
    assert page["total"] == 4 and [s["id"] for s in page["items"]] == [ids[2], ids[1]]
    only_failed = client.get("/api/v1/studies", params={"state": "FAILED"}, headers=h).json()
    assert [s["id"] for s in only_failed["items"]] == [failed]
    assert only_failed["items"][0]["reason"] == "pixel data unreadable"
    two_states = client.get("/api/v1/studies", params=[("state", "FAILED"), ("state", "QUEUED")], headers=h).json()
    assert two_states["total"] == 4
    by_date = client.get(
        "/api/v1/studies", params={"date_from": "2026-01-02", "date_to": "2026-01-31"}, headers=h
    ).json()
    assert sorted(s["id"] for s in by_date["items"]) == ids[1:]
    by_acc = client.get("/api/v1/studies", params={"accession": "ACC000007"}, headers=h).json()
    assert [s["id"] for s in by_acc["items"]] == [failed]
    assert_problem(client.get("/api/v1/studies", params={"state": "NOPE"}, headers=h), 422, "validation-error")
    assert_problem(client.get("/api/v1/studies", params={"limit": 0}, headers=h), 422, "validation-error")


def test_study_detail_with_instances_history_and_404(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    study_id, ds = add_study(registry, api_settings, state=StudyState.SKIPPED, reason="lateral view only")
    body = client.get(f"/api/v1/studies/{study_id}", headers=auth(keys["reader"])).json()
    assert body["state"] == "SKIPPED" and body["reason"] == "lateral view only"
    assert [i["sop_instance_uid"] for i in body["instances"]] == [ds.SOPInstanceUID]
    assert body["instances"][0]["selected"] is True and body["instances"][0]["attributes"]["view_position"] == "PA"
    assert [(e["from_state"], e["to_state"]) for e in body["history"]] == [
        ("RECEIVING", "STABLE"),
        ("STABLE", "SKIPPED"),
    ]
    assert body["history"][-1]["reason"] == "lateral view only"
    assert_problem(client.get("/api/v1/studies/999999", headers=auth(keys["reader"])), 404, "study-not-found")
    assert ("reader", "study.read") in audit_actions(registry, study_id)


def test_rerun_failed_study_and_refusals(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings, redis_db: redis.Redis
) -> None:
    failed, _ = add_study(registry, api_settings, state=StudyState.FAILED, reason="worker crashed")
    queued, _ = add_study(registry, api_settings, state=StudyState.QUEUED, index=1)
    assert_problem(client.post(f"/api/v1/studies/{failed}/rerun", headers=auth(keys["reader"])), 403, "forbidden")
    response = client.post(f"/api/v1/studies/{failed}/rerun", headers=auth(keys["admin"]))
    assert response.status_code == 202, response.text
    assert response.json() == {"study_id": failed, "state": "QUEUED", "enqueued": True}
    with registry.session() as s:  # workers.pipeline.enqueue_report made the job and sent its task
        from radialog.registry import Job

        job = s.scalar(select(Job).where(Job.study_id == failed))
        assert job is not None and job.state == "QUEUED" and job.celery_task_id
    redis_db.delete("report")
    detail = client.get(f"/api/v1/studies/{failed}", headers=auth(keys["admin"])).json()
    assert detail["state"] == "QUEUED" and detail["history"][-1]["reason"] == "re-run requested by admin"
    assert_problem(client.post(f"/api/v1/studies/{queued}/rerun", headers=auth(keys["rad"])), 409, "not-rerunnable")
    actions = audit_actions(registry, failed)
    assert ("reader", "denied") in actions and ("admin", "study.rerun") in actions


def test_report_of_unreported_study_is_409(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    study_id, _ = add_study(registry, api_settings, state=StudyState.RUNNING)
    for path in ("report", "report/versions", "dialog"):
        assert_problem(client.get(f"/api/v1/studies/{study_id}/{path}", headers=auth(keys["rad"])), 409, "not-reported")
    assert_problem(
        client.post(f"/api/v1/studies/{study_id}/report/approve", json={"base_version": 1}, headers=auth(keys["rad"])),
        409,
        "not-reported",
    )


# -- health, metrics, audit, CORS ------------------------------------------------------------------


def test_health_readiness_and_metrics(
    client: TestClient, redis_db: redis.Redis, registry: Registry, api_settings: Settings
) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    not_ready = client.get("/readyz")
    body = assert_problem(not_ready, 503, "not-ready")
    assert body["checks"] == {"registry": "ok", "broker": "ok", "workers": "none ready"}
    assert not_ready.headers["retry-after"]
    add_study(registry, api_settings, state=StudyState.FAILED)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'radialog_studies{state="FAILED"} 1.0' in metrics.text
    assert 'radialog_api_requests_total{method="GET",route="/readyz",status="503"} 1.0' in metrics.text


def test_audit_is_admin_only_and_lists_actions(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    study_id, _ = add_study(registry, api_settings, state=StudyState.FAILED)
    client.get(f"/api/v1/studies/{study_id}", headers=auth(keys["reader"]))
    assert_problem(client.get("/api/v1/audit", headers=auth(keys["rad"])), 403, "forbidden")
    page = client.get("/api/v1/audit", params={"study_id": study_id}, headers=auth(keys["admin"])).json()
    assert [(e["actor"], e["action"]) for e in page["items"]] == [("reader", "study.read")]
    everything = client.get("/api/v1/audit", headers=auth(keys["admin"])).json()
    assert ("rad", "denied") in [(e["actor"], e["action"]) for e in everything["items"]]


def test_cors_is_off_unless_configured(registry: Registry, api_settings: Settings, redis_db: redis.Redis) -> None:
    preflight = {"Origin": "https://pacs.example", "Access-Control-Request-Method": "GET"}
    with TestClient(create_app(api_settings, registry)) as c:
        assert "access-control-allow-origin" not in c.options("/api/v1/studies", headers=preflight).headers
    allowed = api_settings.model_copy(update={"cors_origins": ["https://pacs.example"]})
    with TestClient(create_app(allowed, registry)) as c:
        response = c.options("/api/v1/studies", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://pacs.example"


# -- dialog refusals that need no worker -----------------------------------------------------------


def test_dialog_without_worker_is_503_with_retry_after(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    study_id = add_reported_study(registry, api_settings)
    response = client.post(
        f"/api/v1/studies/{study_id}/dialog/questions",
        json={"question": "Is the heart enlarged?"},
        headers=auth(keys["rad"]),
    )
    assert_problem(response, 503, "no-worker")
    assert int(response.headers["retry-after"]) > 0
    with registry.session() as s:
        assert s.scalars(select(DialogTurn)).all() == []  # nothing half-created


def test_non_streamed_waits_are_bounded_then_answered_202_at_once(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings, redis_db: redis.Redis
) -> None:
    """With every blocking-wait slot taken (clients already waiting for answers), a non-streamed question
    asking to wait 300 s gets 202 + Location at once instead of holding one more of the API's threads.
    The worker here is a readiness key only (ready, never answering), so the turn stays QUEUED."""
    from api.routes import dialog as dialog_routes
    from radialog.messaging import dialog_channel

    study_id = add_reported_study(registry, api_settings)
    redis_db.set(ready_key("busy@test"), json.dumps({"name": "RaDialog-LLaVA", "hostname": "busy@test"}), ex=60)
    answered = threading.Event()

    def answer_later() -> None:
        """Publish the answer a few seconds after the turn exists: a request that waited would get it (200)."""
        while not answered.wait(0.05):
            with registry.session() as session:
                turn = session.scalars(select(DialogTurn)).first()
            if turn is not None:
                answered.wait(3.0)
                redis_db.publish(dialog_channel(REDIS_URL, turn.id), json.dumps({"type": "done", "answer": "No."}))
                return

    taken = 0
    while dialog_routes._blocking_waits.acquire(blocking=False):
        taken += 1
    answerer = threading.Thread(target=answer_later, daemon=True)
    answerer.start()
    try:
        assert taken == dialog_routes.MAX_BLOCKING_WAITS
        response = client.post(
            f"/api/v1/studies/{study_id}/dialog/questions",
            json={"question": "Is the heart enlarged?", "wait_seconds": 300},
            headers=auth(keys["rad"]),
        )
    finally:
        answered.set()
        answerer.join(timeout=10)
        for _ in range(taken):
            dialog_routes._blocking_waits.release()
        redis_db.delete(ready_key("busy@test"), "dialog")
    assert response.status_code == 202, response.text
    turn = response.json()
    assert turn["state"] == "QUEUED" and response.headers["location"] == f"/api/v1/dialog/turns/{turn['id']}"


def test_question_too_long_413_and_bad_actions_422(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    study_id = add_reported_study(registry, api_settings)
    url = f"/api/v1/studies/{study_id}/dialog"
    h = auth(keys["reader"])
    assert_problem(client.post(url + "/questions", json={"question": "x" * 2001}, headers=h), 413, "question-too-long")
    assert_problem(client.post(url + "/questions", json={"question": ""}, headers=h), 422, "validation-error")
    for bad in (
        {"action": "correction"},
        {"action": "correction", "add": ["Unicorn"]},
        {"action": "yes_no"},
        {"action": "yes_no", "finding": "No Finding"},
    ):
        assert_problem(client.post(url + "/actions", json=bad, headers=h), 422, "validation-error")
    assert_problem(client.post(url + "/actions", json={"action": "dance"}, headers=h), 422, "validation-error")


def test_report_too_long_for_the_context_is_422(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    study_id = add_reported_study(registry, api_settings)
    conversation = client.get(f"/api/v1/studies/{study_id}/dialog", headers=auth(keys["rad"])).json()
    assert conversation["turns"] == [] and conversation["seed_report_version"] == 1
    assert 0 < conversation["estimated_tokens"] < conversation["max_context_tokens"]
    # a pasted, very long report: even the report turn alone leaves no room for an answer
    long_text = "The cardiomediastinal silhouette is within normal limits. " * 200
    v2 = client.post(
        f"/api/v1/studies/{study_id}/report/versions", json={"findings_text": long_text}, headers=auth(keys["rad"])
    )
    assert v2.status_code == 201
    body = assert_problem(
        client.post(
            f"/api/v1/studies/{study_id}/dialog/questions",
            json={"question": "And the lungs?"},
            headers=auth(keys["rad"]),
        ),
        422,
        "context-too-long",
    )
    assert "4000" in body["detail"]
    with registry.session() as s:
        assert s.scalars(select(DialogTurn)).all() == []
    with registry.session() as s:  # a long conversation on a short report is the worker's to trim
        conv = s.scalar(select(Conversation).where(Conversation.id == conversation["id"]))
        assert conv is not None and conv.user == "rad"


# -- reports, versions, approval -------------------------------------------------------------------


def test_current_report_versions_and_sr_download(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    import io

    import pydicom

    study_id = add_reported_study(registry, api_settings)
    h = auth(keys["reader"])
    report = client.get(f"/api/v1/studies/{study_id}/report", headers=h).json()
    assert report["version"] == 1 and report["kind"] == "ai_draft" and report["verified"] is False
    assert "NOT VERIFIED" in report["text"] and "small left pleural effusion" in report["text"]
    assert report["document"]["flags"]["verification"] == "UNVERIFIED"
    versions = client.get(f"/api/v1/studies/{study_id}/report/versions", headers=h).json()
    assert versions["current_version"] == 1 and [v["version"] for v in versions["versions"]] == [1]
    sr = client.get(report["sr_url"], headers=h)
    assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(sr.content))
    assert ds.Modality == "SR" and ds.VerificationFlag == "UNVERIFIED" and ds.PreliminaryFlag == "PRELIMINARY"
    assert_problem(client.get(f"/api/v1/studies/{study_id}/report/versions/7", headers=h), 404, "version-not-found")
    assert [a for _, a in audit_actions(registry, study_id)].count("report.sr_download") == 1


def test_reader_cannot_change_or_approve_and_admin_cannot_approve(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    study_id = add_reported_study(registry, api_settings)
    url = f"/api/v1/studies/{study_id}/report"
    assert_problem(
        client.post(url + "/approve", json={"base_version": 1}, headers=auth(keys["reader"])), 403, "forbidden"
    )
    assert_problem(
        client.post(url + "/approve", json={"base_version": 1}, headers=auth(keys["admin"])), 403, "forbidden"
    )
    assert_problem(client.post(url + "/versions", json={"findings_text": "x"}, headers=auth(keys["reader"])), 403)
    assert client.get(url, headers=auth(keys["reader"])).json()["version"] == 1  # nothing changed
    denied = [a for a in audit_actions(registry, study_id) if a[1] == "denied"]
    assert denied == [("reader", "denied"), ("admin", "denied"), ("reader", "denied")]


def test_correction_then_approval_make_new_verified_sr(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    import io

    import pydicom

    study_id = add_reported_study(registry, api_settings)
    url = f"/api/v1/studies/{study_id}/report"
    h = auth(keys["rad"])
    corrected = "The heart size is normal. No pleural effusion. No pneumothorax."
    v2 = client.post(
        url + "/versions",
        json={"kind": "edit", "findings_text": corrected, "base_version": 1, "impression_text": "Normal chest."},
        headers=h,
    )
    assert v2.status_code == 201, v2.text
    assert v2.json()["version"] == 2 and v2.json()["verified"] is False and v2.json()["kind"] == "edit"
    stale = client.post(url + "/versions", json={"findings_text": "older edit", "base_version": 1}, headers=h)
    assert_problem(stale, 409, "stale-version")
    assert_problem(
        client.post(url + "/approve", json={"impression_text": "Normal chest."}, headers=h), 422, "validation-error"
    )  # which version is signed must be said
    assert_problem(
        client.post(url + "/approve", json={"impression_text": "Normal chest.", "base_version": 1}, headers=h),
        409,
        "stale-version",
    )  # the radiologist read v1, v2 is current
    # only the text on screen is signed: another findings or impression text under v2's number is refused
    for other in (
        {"impression_text": "Normal chest. Old rib fracture."},
        {"impression_text": ""},
        {"findings_text": "The heart size is normal. There is a small left pleural effusion."},
    ):
        assert_problem(
            client.post(url + "/approve", json={**other, "base_version": 2}, headers=h), 409, "text-mismatch"
        )
    v3 = client.post(
        url + "/approve",
        json={"findings_text": corrected, "impression_text": "Normal chest.", "base_version": 2},
        headers=h,
    )
    assert v3.status_code == 201, v3.text
    body = v3.json()
    assert body["version"] == 3 and body["verified"] is True and body["verifier"] == "rad"
    assert body["findings_text"] == corrected and body["impression_text"] == "Normal chest."
    assert "NOT VERIFIED" not in body["text"]
    sr = pydicom.dcmread(io.BytesIO(client.get(body["sr_url"], headers=h).content))
    assert sr.VerificationFlag == "VERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert_problem(client.post(url + "/approve", json={"base_version": 3}, headers=h), 409, "already-approved")
    versions = client.get(url + "/versions", headers=h).json()
    assert [(v["version"], v["kind"], v["verified"]) for v in versions["versions"]] == [
        (1, "ai_draft", False),
        (2, "edit", False),
        (3, "approval", True),
    ]
    other = add_study(registry, api_settings, state=StudyState.QUEUED, index=3)[0]
    rows = {s["id"]: s for s in client.get("/api/v1/studies", headers=h).json()["items"]}
    assert (rows[study_id]["latest_report_version"], rows[study_id]["verified"]) == (3, True)
    assert (rows[other]["latest_report_version"], rows[other]["verified"]) == (None, None)
    actions = [a for a in audit_actions(registry, study_id) if a[0] == "rad"]
    assert ("rad", "report.change") in actions and ("rad", "report.approve") in actions


def test_image_preview_is_the_model_image(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    import io

    import numpy as np
    from PIL import Image

    from radialog.imaging import load_model_image

    study_id, ds = add_study(registry, api_settings, state=StudyState.QUEUED)
    response = client.get(f"/api/v1/studies/{study_id}/image.png", headers=auth(keys["reader"]))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(response.content)))
    model = load_model_image(api_settings.spool_dir / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm")
    assert shown.dtype == np.uint8 and np.array_equal(shown, model)
    assert ("reader", "image.read") in audit_actions(registry, study_id)
    with registry.session() as s:  # a study the node could not pick an image for
        from radialog.registry import Study

        s.get(Study, study_id).selected_instance_id = None
    assert_problem(client.get(f"/api/v1/studies/{study_id}/image.png", headers=auth(keys["reader"])), 409, "no-image")


def test_approval_sends_the_export_task_for_the_new_sr(
    registry: Registry, api_settings: Settings, redis_db: redis.Redis
) -> None:
    import base64
    import json

    from radialog.settings import Destination

    with_pacs = api_settings.model_copy(update={"destinations": [Destination(name="pacs", port=1)]})
    redis_db.delete("export")
    keys = make_keys(registry)
    study_id = add_reported_study(registry, with_pacs)
    with TestClient(create_app(with_pacs, registry)) as c:
        approved = c.post(
            f"/api/v1/studies/{study_id}/report/approve", json={"base_version": 1}, headers=auth(keys["rad"])
        ).json()
    [export] = approved["exports"]
    assert export["destination"] == "pacs" and export["state"] == "PENDING"
    messages = [json.loads(raw) for raw in redis_db.lrange("export", 0, -1)]
    sent = [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages]
    assert ("radialog.export", [export["id"]]) in sent
    redis_db.delete("export")


def test_users_cli_creates_lists_and_revokes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from composition.cli import main
    from radialog.settings import get_settings

    monkeypatch.setenv("RADIALOG_DATA_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        created = runner.invoke(main, ["users", "create", "dr-house", "--role", "radiologist"])
        assert created.exit_code == 0, created.output
        key = created.output.strip()
        assert key.startswith("rdl_") and len(key) > 40
        assert runner.invoke(main, ["users", "create", "dr-house", "--role", "reader"]).exit_code != 0
        listed = runner.invoke(main, ["users", "list"]).output
        assert re.search(r"^name +role +created +revoked$", listed, re.MULTILINE) and key not in listed
        assert re.search(r"^dr-house +radiologist +\S+ +-$", listed, re.MULTILINE), listed  # an aligned table
        assert runner.invoke(main, ["users", "revoke", "dr-house"]).exit_code == 0
        listed = runner.invoke(main, ["users", "list"]).output
        assert re.search(r"^dr-house +radiologist +\S+ +\d{4}-\d\d-\d\dT", listed, re.MULTILINE), listed
        assert runner.invoke(main, ["users", "revoke", "nobody"]).exit_code != 0
        registry = Registry.from_settings(get_settings())
        with TestClient(create_app(get_settings(), registry)) as c:
            assert c.get("/api/v1/studies", headers=auth(key)).status_code == 401
        registry.dispose()
    finally:
        get_settings.cache_clear()


def test_page_is_served_with_a_strict_content_security_policy(client: TestClient) -> None:
    index = client.get("/")
    assert index.status_code == 200 and '<script src="/static/app.js">' in index.text
    csp = index.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "https://" not in index.text  # nothing loaded from elsewhere (no CDN)
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "sessionStorage" in script.text and "innerHTML" not in script.text


@pytest.mark.parametrize("registry", ["postgresql"], indirect=True)
def test_two_versions_at_once_one_wins_the_other_is_409(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    """PostgreSQL: the API's insert of version 2 waits on the unique (study, version) index held by an
    uncommitted version 2; once that commits, the API answers 409 instead of a 500 or a silent v3."""
    import threading
    import time

    from sqlalchemy import text

    from reporting.versions import create_version

    study_id = add_reported_study(registry, api_settings)
    result: dict[str, object] = {}

    def post() -> None:
        result["response"] = client.post(
            f"/api/v1/studies/{study_id}/report/versions",
            json={"findings_text": "second edit"},
            headers=auth(keys["rad"]),
        )

    with registry.session() as s:
        create_version(
            s, api_settings, study_id, kind="edit", findings_text="first edit", impression_text=None, author="other"
        )
        worker = threading.Thread(target=post)
        worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "response" not in result:  # until the API waits on our row
            with registry.engine.connect() as conn:
                waiting = conn.execute(
                    text(
                        "select count(*) from pg_stat_activity a join pg_locks l on l.pid = a.pid "
                        "where not l.granted and a.query ilike 'INSERT INTO reports%'"
                    )
                ).scalar()
            if waiting:
                break
            time.sleep(0.05)
    worker.join(timeout=60)
    assert_problem(result["response"], 409, "stale-version")
    versions = client.get(f"/api/v1/studies/{study_id}/report/versions", headers=auth(keys["rad"])).json()
    assert [(v["version"], v["findings_text"]) for v in versions["versions"]][-1] == (2, "first edit")


def test_signing_what_the_radiologist_sees(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    """An emptied impression is saved as a version, then signed as none (signing another text than the
    version's is refused); the signed SR carries no AI-coded findings its text may deny."""
    import io

    import pydicom

    study_id = add_reported_study(registry, api_settings)  # AI draft: Pleural Effusion present (0.9)
    url = f"/api/v1/studies/{study_id}/report"
    h = auth(keys["rad"])
    v2 = client.post(
        url + "/versions",
        json={"kind": "edit", "findings_text": "No effusion.", "impression_text": "Normal."},
        headers=h,
    )
    assert v2.status_code == 201, v2.text
    emptied = {"findings_text": "No effusion.", "impression_text": ""}
    assert_problem(client.post(url + "/approve", json={**emptied, "base_version": 2}, headers=h), 409, "text-mismatch")
    v3 = client.post(url + "/versions", json={"kind": "edit", **emptied, "base_version": 2}, headers=h)
    assert v3.status_code == 201, v3.text
    signed = client.post(url + "/approve", json={**emptied, "base_version": 3}, headers=h)
    assert signed.status_code == 201, signed.text
    assert signed.json()["impression_text"] is None  # "" = the radiologist removed the impression
    sr = pydicom.dcmread(io.BytesIO(client.get(signed.json()["sr_url"], headers=h).content))
    assert sr.VerificationFlag == "VERIFIED"
    dump = str(sr)
    assert "No effusion." in dump and "Normal." not in dump
    assert "Pleural effusion" not in dump and "Probability" not in dump  # no AI codes under a signature
    draft = pydicom.dcmread(io.BytesIO(client.get(f"{url}/versions/1/sr", headers=h).content))
    assert "Probability" in str(draft) and "Pleural effusion" in str(draft)  # the AI draft keeps its codes


def test_control_characters_and_a_lost_source_image_get_clear_errors(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    import shutil

    study_id = add_reported_study(registry, api_settings)
    url = f"/api/v1/studies/{study_id}/report"
    h = auth(keys["rad"])
    assert_problem(client.post(url + "/versions", json={"findings_text": "abc \u0000 x"}, headers=h), 422)
    assert_problem(
        client.post(
            f"/api/v1/studies/{study_id}/dialog/questions", json={"question": "any \u0007 effusion?"}, headers=h
        ),
        422,
    )
    shutil.rmtree(api_settings.spool_dir)  # the source image is gone: no SR can be built
    assert_problem(
        client.post(url + "/versions", json={"findings_text": "Edited."}, headers=h), 409, "cannot-build-report"
    )


def test_model_capabilities_and_actions_a_model_was_not_trained_for(
    registry: Registry, api_settings: Settings, keys: dict[str, str], redis_db: redis.Redis
) -> None:
    """Issue 16: GET /model says what the configured backend can do; XrayGPT's API refuses RaDialog's quick
    actions (422, nothing queued) and sizes conversations to its 2,000 positions."""
    with TestClient(create_app(api_settings, registry)) as c:  # RaDialog v2: everything, 4,000 tokens
        model = c.get("/api/v1/model", headers=auth(keys["reader"])).json()
        assert model["backend"] == "radialog-v2" and model["findings_classifier"] is True
        assert set(model["tasks"]) == {
            "free",
            "correction",
            "yes_no",
            "list",
            "impression",
            "easy_language",
            "summary",
            "view",
        }
        assert model["tasks"]["list"]["prompt"] == "List all the findings in this report."
        assert model["tasks"]["yes_no"]["prompt"] is None and model["context_tokens"] == 4000
    assert_problem(TestClient(create_app(api_settings, registry)).get("/api/v1/model"), 401, "unauthenticated")

    xraygpt = api_settings.model_copy(update={"model_backend": "xraygpt"})
    study_id = add_reported_study(registry, xraygpt)
    url = f"/api/v1/studies/{study_id}/dialog"
    h = auth(keys["rad"])
    with TestClient(create_app(xraygpt, registry)) as c:
        model = c.get("/api/v1/model", headers=h).json()
        assert model == {
            "backend": "xraygpt",
            "model_name": "XrayGPT",
            "findings_classifier": False,
            "tasks": {
                "free": {"prompt": None, "max_new_tokens": 300},
                "list": {"prompt": "What are the key findings in this chest x-ray image?", "max_new_tokens": 300},
                "impression": {
                    "prompt": "Based on the findings in this chest x-ray image, what is the overall impression?",
                    "max_new_tokens": 300,
                },
            },
            "context_tokens": 2000,
            "image_tokens": 32,
        }
        for action in (
            {"action": "yes_no", "finding": "Edema"},
            {"action": "correction", "add": ["Edema"]},
            {"action": "easy_language"},
            {"action": "summary"},
            {"action": "view"},
        ):
            body = assert_problem(c.post(url + "/actions", json=action, headers=h), 422, "task-not-supported")
            assert "XrayGPT was not trained for" in body["detail"]
        conversation = c.get(url, headers=h).json()
        assert conversation["max_context_tokens"] == 2000
        # a report that fits RaDialog's 4,000 tokens but not XrayGPT's 2,000 with the answer
        long_text = "The cardiomediastinal silhouette is within normal limits. " * 100
        assert (
            c.post(
                f"/api/v1/studies/{study_id}/report/versions", json={"findings_text": long_text}, headers=h
            ).status_code
            == 201
        )
        body = assert_problem(
            c.post(url + "/questions", json={"question": "And the lungs?"}, headers=h), 422, "context-too-long"
        )
        assert "2000" in body["detail"]
    with registry.session() as s:
        assert s.scalars(select(DialogTurn)).all() == []


def test_radialog_v1_capabilities_and_refused_actions(
    registry: Registry, api_settings: Settings, keys: dict[str, str], redis_db: redis.Redis
) -> None:
    """Issue 17: GET /model for RaDialog v1 lists the tasks RaDialog-INS was trained for with its limits and
    2,048 positions; v2's impression and view question are refused (422, nothing queued)."""
    v1 = api_settings.model_copy(update={"model_backend": "radialog-v1"})
    study_id = add_reported_study(registry, v1)
    url = f"/api/v1/studies/{study_id}/dialog"
    h = auth(keys["rad"])
    with TestClient(create_app(v1, registry)) as c:
        model = c.get("/api/v1/model", headers=h).json()
        assert model == {
            "backend": "radialog-v1",
            "model_name": "RaDialog v1",
            "findings_classifier": True,
            "tasks": {
                "free": {"prompt": None, "max_new_tokens": 300},
                "correction": {"prompt": None, "max_new_tokens": 256},
                "yes_no": {"prompt": None, "max_new_tokens": 10},
                "list": {"prompt": "List all the findings in this report.", "max_new_tokens": 30},
                "easy_language": {
                    "prompt": "Translate this report to easy language for a patient to understand.",
                    "max_new_tokens": 300,
                },
                "summary": {
                    "prompt": "Please summarize the given report in maximum two sentences.",
                    "max_new_tokens": 300,
                },
            },
            "context_tokens": 2048,
            "image_tokens": 32,
        }
        for action in ({"action": "impression"}, {"action": "view"}):
            body = assert_problem(c.post(url + "/actions", json=action, headers=h), 422, "task-not-supported")
            assert "RaDialog v1 was not trained for" in body["detail"]
        assert c.get(url, headers=h).json()["max_context_tokens"] == 2048
    with registry.session() as s:
        assert s.scalars(select(DialogTurn)).all() == []


# -- who is signed in; what changed between versions (issue 13) -------------------------------------------


def test_me_names_the_keys_user_and_role(client: TestClient, keys: dict[str, str]) -> None:
    assert client.get("/api/v1/me", headers=auth(keys["rad"])).json() == {"name": "rad", "role": "radiologist"}
    assert client.get("/api/v1/me", headers=auth(keys["reader"])).json() == {"name": "reader", "role": "reader"}
    assert_problem(client.get("/api/v1/me"), 401, "unauthenticated")


def test_versions_say_what_changed_word_by_word(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    study_id = add_reported_study(registry, api_settings, findings_text="The heart is normal. Small left effusion.")
    url = f"/api/v1/studies/{study_id}/report"
    h = auth(keys["rad"])
    client.post(
        url + "/versions",
        headers=h,
        json={
            "findings_text": "The heart is enlarged.\nSmall left effusion. No pneumothorax.",
            "impression_text": "Cardiomegaly.",
            "base_version": 1,
        },
    )
    versions = client.get(url + "/versions", headers=h).json()["versions"]
    assert versions[0]["changes"] is None
    changes = versions[1]["changes"]
    assert changes["predecessor_version"] == 1
    assert [(p["op"], p["text"]) for p in changes["findings"]] == [
        ("equal", "The heart is"),
        ("delete", "normal."),
        ("insert", "enlarged."),
        ("equal", "Small left effusion."),
        ("insert", "No pneumothorax."),
    ]
    assert changes["impression"] == [{"op": "insert", "text": "Cardiomegaly."}]
    assert client.get(url + "/versions/2", headers=h).json()["changes"] == changes


# -- the image viewer: full frame, window, MONOCHROME1, 16-bit, bounds (issue 13) -------------------------


def _linear(x, center: float, width: float):  # type: ignore[no-untyped-def]
    """PS3.3 C.11.2.1.2.1 (LINEAR) into 0..255, written out here independently of the code under test."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0.0, y)
    y = np.where(x > center - 0.5 + (width - 1) / 2, 255.0, y)
    return np.rint(y).astype(np.uint8)


def _replace_pixels(api_settings: Settings, ds, pixels, **attributes) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the study's spooled image with ``pixels`` and header ``attributes`` (same UIDs)."""
    import numpy as np

    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(api_settings.spool_dir / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


def _png(response):  # type: ignore[no-untyped-def]
    import io

    import numpy as np
    from PIL import Image

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_viewer_renders_a_monochrome1_image_with_its_header_window(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    """MONOCHROME1, 12 bits stored in 16: the header window (centre 2048, width 1024) on a 0..4095 ramp,
    shown inverted (the lowest value white); ``invert`` flips it back; a region outside the image is black."""
    import numpy as np

    study_id, ds = add_study(registry, api_settings, state=StudyState.QUEUED)
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    _replace_pixels(
        api_settings,
        ds,
        ramp,
        PhotometricInterpretation="MONOCHROME1",
        BitsAllocated=16,
        BitsStored=12,
        HighBit=11,
        PixelRepresentation=0,
        RescaleSlope=1,
        RescaleIntercept=0,
        WindowCenter=2048,
        WindowWidth=1024,
        WindowCenterWidthExplanation="SOFT",
    )
    h = auth(keys["reader"])
    info = client.get(f"/api/v1/studies/{study_id}/image", headers=h).json()
    assert (info["rows"], info["columns"], info["photometric_interpretation"]) == (64, 64, "MONOCHROME1")
    assert info["inverse_display"] is True and info["default_preset"] == "window:0"
    assert (info["value_min"], info["value_max"]) == (0, 4095)
    assert info["presets"][0] == {
        "id": "window:0",
        "label": "SOFT",
        "center": 2048,
        "width": 1024,
        "function": "LINEAR",
        "lut": False,
    }
    url = f"/api/v1/studies/{study_id}/image/render?out_width=64&out_height=64"
    shown = _png(client.get(url, headers=h))
    expected = 255 - _linear(ramp, 2048, 1024)
    assert np.array_equal(shown, expected)
    assert shown[0, 0] == 255 and shown[-1, -1] == 0  # low values white, high values black
    assert np.array_equal(_png(client.get(url + "&invert=true", headers=h)), _linear(ramp, 2048, 1024))
    # a custom window, and a region half outside the image (panned left, 1:1): outside is black
    custom = _png(client.get(url + "&window_center=1000&window_width=200", headers=h))
    assert np.array_equal(custom, 255 - _linear(ramp, 1000, 200))
    half = _png(
        client.get(
            f"/api/v1/studies/{study_id}/image/render?x=-16&y=16&w=32&h=32&out_width=32&out_height=32", headers=h
        )
    )
    assert (half[:, :16] == 0).all() and np.array_equal(half[:, 16:], expected[16:48, 0:16])
    zoomed = _png(
        client.get(f"/api/v1/studies/{study_id}/image/render?x=0&y=0&w=32&h=32&out_width=256&out_height=256", headers=h)
    )  # 8x: bilinear between the same pixels
    assert zoomed.shape == (256, 256)
    assert np.abs(zoomed[4::8, 4::8].astype(int) - expected[:32, :32]).max() <= 2


def test_viewer_renders_16_bit_signed_values_through_the_modality_lut(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    """16 bits stored, signed, Rescale Slope 2 and Intercept -1024: the window applies to modality values."""
    import numpy as np

    study_id, ds = add_study(registry, api_settings, state=StudyState.QUEUED)
    stored = np.linspace(-32768, 32767, 128 * 96).round().astype(np.int16).reshape(96, 128)
    _replace_pixels(
        api_settings,
        ds,
        stored,
        PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        PixelRepresentation=1,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=[0, 20000],
        WindowWidth=[4000, 60000],
    )
    h = auth(keys["reader"])
    info = client.get(f"/api/v1/studies/{study_id}/image", headers=h).json()
    modality = stored.astype(np.float64) * 2 - 1024
    assert (info["value_min"], info["value_max"]) == (modality.min(), modality.max())
    assert [p["id"] for p in info["presets"]] == ["window:0", "window:1", "full"]
    base = f"/api/v1/studies/{study_id}/image/render?out_width=128&out_height=96"
    assert np.array_equal(_png(client.get(base, headers=h)), _linear(modality, 0, 4000))
    assert np.array_equal(_png(client.get(base + "&preset=window:1", headers=h)), _linear(modality, 20000, 60000))
    assert np.array_equal(
        _png(client.get(base + "&window_center=-5000&window_width=9000", headers=h)), _linear(modality, -5000, 9000)
    )
    full = _png(client.get(base + "&preset=full", headers=h))
    assert full.min() == 0 and full.max() == 255  # the full range spans the whole grey scale
    assert_problem(client.get(base + "&preset=lut:0", headers=h), 422, "unknown-preset")


def test_viewer_bounds_huge_images_concurrent_renders_and_the_audit(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    """A header announcing 8000 x 8000 pixels is refused before anything is decoded; a second window costs no
    second decode; with every render slot busy the answer is 503 + Retry-After; a drag's many renders are one
    audit entry; the other images of the study can be shown, other studies' images cannot."""
    import numpy as np

    from api.viewer import Renderer

    h = auth(keys["rad"])
    study_id, _ = add_study(registry, api_settings, state=StudyState.QUEUED)
    huge_id, huge = add_study(registry, api_settings, state=StudyState.QUEUED, index=1)
    _replace_pixels(api_settings, huge, np.zeros((4, 4), dtype=np.uint16))
    huge.Rows = huge.Columns = 8000  # the pixel data is tiny: decoding it would fail, so it must not be tried
    huge.save_as(
        api_settings.spool_dir / huge.StudyInstanceUID / f"{huge.SOPInstanceUID}.dcm", enforce_file_format=True
    )
    assert_problem(client.get(f"/api/v1/studies/{huge_id}/image/render", headers=h), 409, "image-too-large")

    client.get(f"/api/v1/studies/{study_id}/image", headers=h)
    renderer = client.app.state.viewer[0]
    decodes = renderer.decodes
    for center in (1000, 1500, 2000):
        _png(client.get(f"/api/v1/studies/{study_id}/image/render?window_center={center}&window_width=800", headers=h))
    assert renderer.decodes == decodes
    assert [a for a in audit_actions(registry, study_id) if a[1] == "image.read"] == [("rad", "image.read")]

    client.app.state.viewer = (Renderer(slots=1, wait_s=0.05), client.app.state.viewer[1])
    client.app.state.viewer[0]._slots.acquire()  # a render that takes forever holds the only slot
    busy = client.get(f"/api/v1/studies/{study_id}/image/render", headers=h)
    assert_problem(busy, 503, "viewer-busy")
    assert busy.headers["retry-after"] == "2"
    assert client.get(f"/api/v1/studies/{study_id}/report/versions", headers=h).status_code == 409  # others served
    assert client.get("/api/v1/studies", headers=h).status_code == 200
    client.app.state.viewer[0]._slots.release()
    _png(client.get(f"/api/v1/studies/{study_id}/image/render", headers=h))

    with registry.session() as s:
        from radialog.registry import Study

        other_instance = s.get(Study, huge_id).selected_instance_id
    assert_problem(
        client.get(f"/api/v1/studies/{study_id}/image?instance={other_instance}", headers=h), 404, "instance-not-found"
    )
    assert_problem(client.get(f"/api/v1/studies/{study_id}/image/render?w=0", headers=h), 422)
    assert_problem(client.get(f"/api/v1/studies/{study_id}/image/render?out_width=5000", headers=h), 422)


def test_viewer_offers_and_applies_the_headers_voi_lut(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    """A VOI LUT in the header is the default preset (as for the model) and is applied as a table: inputs
    below its first entry take entry 0, above its last the last one; a drag from it is a linear window."""
    import numpy as np
    from pydicom.dataset import Dataset

    study_id, ds = add_study(registry, api_settings, state=StudyState.QUEUED)
    ramp = np.arange(0, 2048, 2, dtype=np.uint16).reshape(32, 32)
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [256, 512, 12])  # 256 entries, first input 512, 12-bit output
    lut.add_new("LUTData", "OW", np.array([16 * i for i in range(256)], dtype="<u2").tobytes())  # as OW, like most
    lut.LUTExplanation = "LUNG"
    _replace_pixels(
        api_settings, ds, ramp, BitsAllocated=16, BitsStored=12, HighBit=11, PixelRepresentation=0, VOILUTSequence=[lut]
    )
    h = auth(keys["reader"])
    info = client.get(f"/api/v1/studies/{study_id}/image", headers=h).json()
    assert info["default_preset"] == "lut:0"
    assert info["presets"][0] == {
        "id": "lut:0",
        "label": "LUNG",
        "center": 640,
        "width": 256,
        "function": "LINEAR",
        "lut": True,
    }
    shown = _png(client.get(f"/api/v1/studies/{study_id}/image/render?out_width=32&out_height=32", headers=h))
    index = np.clip(ramp.astype(int) - 512, 0, 255)
    assert np.array_equal(shown, np.rint(16 * index / (16 * 255) * 255).astype(np.uint8))
    dragged = _png(
        client.get(
            f"/api/v1/studies/{study_id}/image/render?out_width=32&out_height=32"
            "&preset=lut:0&window_center=640&window_width=256",
            headers=h,
        )
    )
    assert np.array_equal(dragged, _linear(ramp, 640, 256))
