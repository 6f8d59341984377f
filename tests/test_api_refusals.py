"""Refusals and odd input through the app (TestClient) on SQLite and on the real PostgreSQL: never a 500,
every refusal of a known caller audited, impossible characters refused before the database, no caching
of patient data, and a dialog answer only its asker can turn into a report version."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.users import create_user
from radialog.registry import AuditEntry, Conversation, DialogTurn, Registry, Report, StudyState, utcnow
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.seeding import add_reported_study, add_study, make_keys

REDIS_URL = redis_url(__name__)


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"broker_url": REDIS_URL})


@pytest.fixture
def client(registry: Registry, api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings, registry)) as c:
        yield c


@pytest.fixture
def keys(registry: Registry) -> dict[str, str]:
    return make_keys(registry)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def entries(registry: Registry, actor: str) -> list[AuditEntry]:
    with registry.session() as s:
        return list(s.scalars(select(AuditEntry).where(AuditEntry.actor == actor).order_by(AuditEntry.id)))


ODD_IDS = ["999999", "²", "99999999999999999999", "1e3", "-1", "%00"]


def test_refused_requests_for_missing_or_odd_study_ids_are_audited_never_500(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    """A reader may not re-run: every attempt is 403 and one 'denied' entry, whatever the id. An id that
    names no study (or none can) is kept as sent in the detail; the entry's study is then empty."""
    failed, _ = add_study(registry, api_settings, state=StudyState.FAILED, index=1)
    for raw in [*ODD_IDS, str(failed)]:
        response = client.post(f"/api/v1/studies/{raw}/rerun", headers=auth(keys["reader"]))
        assert response.status_code == 403, (raw, response.text)
    denied = entries(registry, "reader")
    assert [e.action for e in denied] == ["denied"] * (len(ODD_IDS) + 1)
    assert [e.study_id for e in denied] == [None] * len(ODD_IDS) + [failed]
    assert [e.detail.get("requested_study") for e in denied[:-1]] == [
        "999999",
        "²",
        "99999999999999999999",
        "1e3",
        "-1",
        "\x00",
    ]
    assert all(e.detail["status"] == 403 and e.detail["route"].endswith("/studies/{study_id}/rerun") for e in denied)


def test_every_refusal_of_a_known_caller_is_audited(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    """404 (no such study), 409 (not reported yet), 422 (invalid id or body): one 'refused' entry each."""
    queued, _ = add_study(registry, api_settings, state=StudyState.QUEUED, index=2)
    h = auth(keys["rad"])
    assert client.get("/api/v1/studies/999999", headers=h).status_code == 404
    assert client.get(f"/api/v1/studies/{queued}/report", headers=h).status_code == 409
    assert client.get("/api/v1/studies/²", headers=h).status_code == 422
    assert (
        client.post(
            f"/api/v1/studies/{queued}/report/versions",
            headers=h,
            content=b"{not json",
        ).status_code
        == 422
    )
    refused = entries(registry, "rad")
    assert [(e.action, e.detail["status"], e.study_id, e.detail.get("requested_study")) for e in refused] == [
        ("refused", 404, None, "999999"),
        ("refused", 409, queued, None),
        ("refused", 422, None, "²"),
        ("refused", 422, queued, None),
    ]


def test_audit_log_for_an_unknown_study_answers_and_is_audited(
    client: TestClient, keys: dict[str, str], registry: Registry
) -> None:
    response = client.get("/api/v1/audit", params={"study_id": 999999}, headers=auth(keys["admin"]))
    assert response.status_code == 200, response.text
    assert response.json()["items"] == []
    [read] = entries(registry, "admin")
    assert (read.action, read.study_id, read.detail) == ("audit.read", None, {"requested_study": "999999"})


@pytest.mark.parametrize(
    ("path", "name"), [("/api/v1/studies", "accession"), ("/api/v1/audit", "actor"), ("/api/v1/audit", "action")]
)
@pytest.mark.parametrize("value", ["\x00", "A\x00B", "x\x1by", "\x7f"])
def test_impossible_characters_in_query_values_are_422_before_the_database(
    client: TestClient, keys: dict[str, str], path: str, name: str, value: str
) -> None:
    """PostgreSQL refuses a NUL in any text parameter (the driver raises): the API answers 422 naming the
    parameter instead of letting it reach the database."""
    response = client.get(path, params={name: value}, headers=auth(keys["admin"]))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert [e["loc"] for e in response.json()["errors"]] == [["query", name]]


def test_every_api_response_says_no_store(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    """Reports, images, SR files, conversations and errors: nothing under /api/ may sit in a cache."""
    study_id = add_reported_study(registry, api_settings)
    h = auth(keys["rad"])
    paths = [
        "/api/v1/studies",
        f"/api/v1/studies/{study_id}",
        f"/api/v1/studies/{study_id}/report",
        f"/api/v1/studies/{study_id}/report/versions",
        f"/api/v1/studies/{study_id}/report/versions/1",
        f"/api/v1/studies/{study_id}/report/versions/1/sr",
        f"/api/v1/studies/{study_id}/image.png",
        f"/api/v1/studies/{study_id}/dialog",
        "/api/v1/studies/999999",
    ]
    for path in paths:
        response = client.get(path, headers=h)
        assert response.status_code in (200, 404), (path, response.text)
        assert response.headers.get("cache-control") == "no-store", path


def _turn_of(registry: Registry, study_id: int, user: str) -> int:
    with registry.session() as session:
        report = session.scalars(select(Report).where(Report.study_id == study_id)).one()
        conversation = Conversation(study_id=study_id, user=user, seed_report_id=report.id, created_at=utcnow())
        session.add(conversation)
        session.flush()
        turn = DialogTurn(
            conversation_id=conversation.id,
            task="correction",
            question="q",
            state="DONE",
            answer="The heart size is normal.",
            created_at=utcnow(),
            answered_at=utcnow(),
        )
        session.add(turn)
        session.flush()
        return turn.id


def test_a_dialog_turn_of_another_user_is_not_a_source_of_a_new_version(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings
) -> None:
    study_id = add_reported_study(registry, api_settings)
    with registry.session() as session:
        other_key = create_user(session, "rad2", "radiologist")
    theirs, mine = _turn_of(registry, study_id, "rad2"), _turn_of(registry, study_id, "rad")
    body = {"kind": "ai_correction", "findings_text": "The heart size is normal.", "base_version": 1}
    refused = client.post(
        f"/api/v1/studies/{study_id}/report/versions",
        headers=auth(keys["rad"]),
        json={**body, "source_turn_id": theirs},
    )
    assert refused.status_code == 404 and refused.json()["type"].endswith("/turn-not-found"), refused.text
    accepted = client.post(
        f"/api/v1/studies/{study_id}/report/versions", headers=auth(keys["rad"]), json={**body, "source_turn_id": mine}
    )
    assert accepted.status_code == 201, accepted.text
    assert other_key  # the other radiologist exists and holds a key


def test_docs_page_loads_nothing_from_elsewhere(client: TestClient) -> None:
    """No Swagger UI from a CDN: /api/docs points at the OpenAPI document, which stays."""
    response = client.get("/api/docs", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "/api/v1/openapi.json"
    assert "http" not in response.text
    document = client.get("/api/v1/openapi.json")
    assert document.status_code == 200 and document.json()["info"]["title"]


@pytest.mark.parametrize("body", [b'{"kind": "edit", "findings_text": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000])
def test_a_body_that_cannot_be_read_as_json_is_a_documented_422(
    client: TestClient, keys: dict[str, str], registry: Registry, api_settings: Settings, body: bytes
) -> None:
    """Bytes that are not UTF-8, or nesting too deep for the parser: FastAPI answered an undocumented 400."""
    study_id = add_reported_study(registry, api_settings)
    response = client.post(
        f"/api/v1/studies/{study_id}/report/versions",
        content=body,
        headers={**auth(keys["rad"]), "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["body"]
    assert [e.detail["status"] for e in entries(registry, "rad")] == [422]


@pytest.mark.parametrize(
    ("path", "name"),
    [("/api/v1/audit", "since"), ("/api/v1/quality/agreement", "from"), ("/api/v1/quality/agreement", "to")],
)
@pytest.mark.parametrize(
    ("since", "status"),
    [
        ("2000-01-01T00:00:01+23:00", 200),
        ("2000-01-01T00:00:01", 200),
        ("1999-12-02T00:00:00+16:00", 200),
        ("0001-01-01T00:00:00+23:00", 200),
        ("9999-12-31T23:59:59-23:00", 200),
        ("0001-01-03T00:00:00Z", 200),
        ("9999-12-31T23:59:59Z", 200),
    ],
)
def test_query_times_with_any_iso_offset_are_answered(
    client: TestClient, keys: dict[str, str], path: str, name: str, since: str, status: int
) -> None:
    """ISO 8601 allows offsets to +-23:59, PostgreSQL only to +-15:59 (found by tests/test_api_fuzz.py, first
    for the audit log, then in CI for the agreement figures); a bound near year 1 overflowed the period
    arithmetic. A schema-valid bound is answered (clamped)."""
    response = client.get(path, params={name: since}, headers=auth(keys["admin"]))
    assert response.status_code == status, response.text
