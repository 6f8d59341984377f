"""Schemathesis against the OpenAPI document: no operation answers with an unhandled error (500), and
every answer matches what the document says (status codes, content types, bodies).

No worker runs here, so the dialog operations answer 503 (documented, with Retry-After); the check
replacing ``not_a_server_error`` therefore refuses only 500, the code of an unhandled exception.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.support.brokers import redis_url
from api.app import create_app
from api.testing import add_reported_study, add_study, make_keys
from radialog.registry import Registry, StudyState
from radialog.settings import Settings

REDIS_URL = redis_url(14)


@pytest.fixture
def api_schema(registry: Registry, settings: Settings) -> Iterator[schemathesis.BaseSchema]:
    api_settings = settings.model_copy(update={"broker_url": REDIS_URL})
    keys = make_keys(registry)
    add_reported_study(registry, api_settings)  # id 1: reported, so report operations reach their code
    add_study(registry, api_settings, state=StudyState.FAILED, index=1)
    app = create_app(api_settings, registry)
    with TestClient(app):
        schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
        schema.config.headers = {"Authorization": f"Bearer {keys['rad']}", "X-API-Key": keys["rad"]}
        yield schema
    client = redis.Redis.from_url(REDIS_URL)
    client.delete("dialog", "export", "report")  # nothing may be left for another test's worker
    client.close()


@schemathesis.check
def no_unhandled_error(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    if response.status_code == 500:
        raise AssertionError(f"500 from {case.method} {case.path}: {response.text[:300]}")


def test_api_conforms_to_its_openapi_document(api_schema: schemathesis.BaseSchema) -> None:
    """A few examples per operation (schemathesis' pytest loader does not run under pytest 9, so the
    operations' hypothesis strategies are driven directly)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(excluded_checks=[not_a_server_error], additional_checks=[no_unhandled_error])

        run()
