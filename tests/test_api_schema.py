"""Schemathesis against the OpenAPI document, with each role's key (reader, radiologist, admin) on SQLite and
PostgreSQL: no operation answers with an unhandled error, every answer matches what the document says
(status codes, content types, bodies), and every refusal of a known caller is in the audit log.

No worker runs here, so the dialog operations and /readyz answer 503 "no worker" / "not ready" (documented,
with Retry-After): the one 5xx accepted. With a real worker, tests/test_api_fuzz.py (slow, stateful) accepts none.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from sqlalchemy import func, select

from api.app import create_app
from radialog.registry import AuditEntry, Registry, StudyState
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.seeding import USERS, add_reported_study, add_study, make_keys

REDIS_URL = redis_url(__name__)


def refusals(registry: Registry, actor: str) -> int:
    with registry.session() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(AuditEntry)
                .where(AuditEntry.actor == actor, AuditEntry.action.in_(["denied", "refused"]))
            )
            or 0
        )


class AuditedRefusals:
    """A check: each 4xx answered to the caller (401 aside: no caller then) adds one refusal entry."""

    __name__ = "audited_refusals"  # schemathesis names its checks

    def __init__(self, registry: Registry, actor: str, allow_no_worker: bool) -> None:
        self.registry, self.actor, self.allow_no_worker = registry, actor, allow_no_worker
        self.expected = refusals(registry, actor)
        self.statuses: dict[int, int] = {}

    def __call__(
        self, ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
    ) -> None:
        status = response.status_code
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status >= 500 and not (
            self.allow_no_worker
            and status == 503
            and response.json().get("type", "").endswith(("/no-worker", "/not-ready"))
        ):
            raise AssertionError(f"{status} from {case.method} {case.path}: {response.text[:300]}")
        if 400 <= status < 500 and status != 401:
            self.expected += 1
        found = refusals(self.registry, self.actor)
        if found != self.expected:
            raise AssertionError(
                f"{status} from {case.method} {case.path}: {found} refusal entries, expected {self.expected}"
            )


def seed(registry: Registry, api_settings: Settings) -> dict[str, str]:
    keys = make_keys(registry)
    add_reported_study(registry, api_settings)  # id 1: reported, so report operations reach their code
    add_study(registry, api_settings, state=StudyState.FAILED, index=1)
    return keys


@pytest.fixture
def api_settings(settings: Settings) -> Iterator[Settings]:
    yield settings.model_copy(update={"broker_url": REDIS_URL})
    client = redis.Redis.from_url(REDIS_URL)
    client.delete("dialog", "export", "report")  # nothing may be left for another test's worker
    client.close()


@pytest.mark.parametrize("user", sorted(USERS))
def test_api_conforms_to_its_openapi_document_for_every_role(
    registry: Registry, api_settings: Settings, user: str
) -> None:
    """A few examples per operation (schemathesis' pytest loader does not run under pytest 9, so the
    operations' hypothesis strategies are driven directly)."""
    keys = seed(registry, api_settings)
    app = create_app(api_settings, registry)
    check = AuditedRefusals(registry, user, allow_no_worker=True)
    with TestClient(app):
        schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
        schema.config.headers = {"Authorization": f"Bearer {keys[user]}", "X-API-Key": keys[user]}
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
            )
            def run(case: schemathesis.Case) -> None:
                case.call_and_validate(excluded_checks=[not_a_server_error], additional_checks=[check])

            run()
    refused = sum(n for status, n in check.statuses.items() if 400 <= status < 500 and status != 401)
    assert refused and check.expected == refusals(registry, user)
