"""The API side of issue 19: the worklist shows and filters by priority (with the deciding rule), and
GET /studies/{id}/report/fhir serves a DiagnosticReport that fhir.resources validates: preliminary for the
AI draft, final once approved (with the radiologist), audited."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.app import create_app
from radialog.registry import AuditEntry, Registry, Study
from radialog.settings import Settings
from reporting.channels import fhir
from reporting.versions import create_version
from tests.support.brokers import redis_url
from tests.support.seeding import add_reported_study, make_keys


@pytest.fixture
def client(sqlite_registry: Registry, settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"broker_url": redis_url(__name__)}), sqlite_registry)
    with TestClient(app) as c:
        yield c


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_worklist_shows_and_filters_priority(client: TestClient, sqlite_registry: Registry, settings: Settings) -> None:
    keys = make_keys(sqlite_registry)
    routine = add_reported_study(sqlite_registry, settings, index=0)
    urgent = add_reported_study(sqlite_registry, settings, index=1)
    with sqlite_registry.session() as session:
        session.execute(
            update(Study)
            .where(Study.id == urgent)
            .values(
                priority="HIGH",
                routing={"rule": "stat-order", "action": "report", "priority": "HIGH", "reason": None, "notes": []},
            )
        )
    page = client.get("/api/v1/studies", headers=_auth(keys["reader"])).json()
    by_id = {s["id"]: s for s in page["items"]}
    assert (by_id[urgent]["priority"], by_id[urgent]["routing_rule"]) == ("HIGH", "stat-order")
    assert (by_id[routine]["priority"], by_id[routine]["routing_rule"]) == ("ROUTINE", None)
    high = client.get("/api/v1/studies?priority=HIGH", headers=_auth(keys["reader"])).json()
    assert [s["id"] for s in high["items"]] == [urgent] and high["total"] == 1
    both = client.get("/api/v1/studies?priority=HIGH&priority=ROUTINE", headers=_auth(keys["reader"])).json()
    assert both["total"] == 2
    bad = client.get("/api/v1/studies?priority=URGENT", headers=_auth(keys["reader"]))
    assert bad.status_code == 422


def test_fhir_report_is_valid_and_follows_the_versions(
    client: TestClient, sqlite_registry: Registry, settings: Settings
) -> None:
    keys = make_keys(sqlite_registry)
    study_id = add_reported_study(sqlite_registry, settings)
    response = client.get(f"/api/v1/studies/{study_id}/report/fhir", headers=_auth(keys["reader"]))
    assert response.status_code == 200 and response.headers["content-type"] == "application/fhir+json"
    draft = response.json()
    fhir.validate(draft)
    assert draft["status"] == "preliminary" and draft["code"]["coding"][0]["code"] == "18748-4"
    assert [c["resourceType"] for c in draft["contained"]].count("Device") == 1
    assert any(c["resourceType"] == "Observation" for c in draft["contained"])
    text = base64.b64decode(draft["presentedForm"][0]["data"]).decode()
    assert text.startswith("AI DRAFT - NOT VERIFIED")

    with sqlite_registry.session() as session:
        report = session.get(Study, study_id).reports[-1]
        create_version(
            session,
            settings,
            study_id,
            kind="approval",
            findings_text=report.findings_text,
            impression_text=None,
            author="rad",
            approve=True,
        )
    final = client.get(f"/api/v1/studies/{study_id}/report/fhir", headers=_auth(keys["reader"])).json()
    fhir.validate(final)
    assert final["status"] == "final" and final["resultsInterpreter"] == [{"display": "rad"}]
    assert final["id"] == draft["id"]
    with sqlite_registry.session() as session:
        create_version(
            session,
            settings,
            study_id,
            kind="edit",
            findings_text="Not signed yet.",
            impression_text=None,
            author="rad",
        )
    still = client.get(f"/api/v1/studies/{study_id}/report/fhir", headers=_auth(keys["reader"])).json()
    assert (
        still["status"] == "final"
        and "Not signed yet." not in base64.b64decode(still["presentedForm"][0]["data"]).decode()
    )
    with sqlite_registry.session() as session:
        actions = list(session.scalars(select(AuditEntry.action).where(AuditEntry.study_id == study_id)))
    assert actions.count("report.fhir") == 3
    assert client.get(f"/api/v1/studies/{study_id}/report/fhir").status_code == 401
    assert client.get("/api/v1/studies/999999/report/fhir", headers=_auth(keys["reader"])).status_code == 404
