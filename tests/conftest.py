"""Shared fixtures: settings in a temporary data directory, and the registry on SQLite and PostgreSQL.

PostgreSQL is the machine's real server (127.0.0.1:5432, database ``test``, trust auth); each test
gets its own schema so tests never see each other's rows.

The suite's own configuration is ``RADIALOG_TEST_*`` (``RADIALOG_TEST_REDIS``, ``RADIALOG_TEST_PG_URL``), read
when this module is imported. Every other ``RADIALOG_*`` variable is removed from the environment for each
test (``no_product_environment``): an in-process ``Settings(...)`` must never pick up the developer's exported
database, broker or PACS. Subprocesses get the variables a test gives them (``tests.support.processes``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from radialog.registry import Registry
from radialog.registry.db import temporary_schema
from radialog.settings import Settings
from tests.support import brokers

PG_URL = os.environ.get("RADIALOG_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
#: Variables that configure the test suite itself (not the product): kept in the environment.
TEST_CONFIG_PREFIX = "RADIALOG_TEST_"


def product_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``RADIALOG_*`` names in ``environ`` that configure the product (everything but ``RADIALOG_TEST_*``)."""
    return [k for k in environ if k.startswith("RADIALOG_") and not k.startswith(TEST_CONFIG_PREFIX)]


@pytest.fixture(autouse=True)
def no_product_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No exported ``RADIALOG_*`` reaches a test (restored afterwards)."""
    for name in product_variables(os.environ):
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def empty_shared_redis_database(request: pytest.FixtureRequest) -> None:
    """Modules that share ``brokers.SHARED_DB`` start each test with it empty (nothing left by another module)."""
    module = request.module.__name__
    if not brokers.flushed_per_test(module):
        return
    import redis

    client = redis.Redis.from_url(brokers.redis_url(module))
    try:
        client.flushdb()
    except redis.ConnectionError:  # no server: nothing was left there either; a test that needs it fails itself
        pass
    finally:
        client.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var", min_free_bytes=0, stable_after=0.5)


def _pg_schema_registry() -> Iterator[Registry]:
    with temporary_schema(PG_URL, prefix="t") as url:
        registry = Registry(url)
        try:
            registry.migrate()
            yield registry
        finally:
            registry.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Registry]:
    """The registry, once on SQLite (WAL file) and once on the real PostgreSQL."""
    if request.param == "sqlite":
        reg = Registry.from_settings(settings)
        yield reg
        reg.dispose()
    else:
        yield from _pg_schema_registry()


@pytest.fixture
def sqlite_registry(settings: Settings) -> Iterator[Registry]:
    reg = Registry.from_settings(settings)
    yield reg
    reg.dispose()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny random RaDialog checkpoint in the published layout (model dir, llava base dir), made once
    per run (make_tiny is reproducible per seed). Read-only: a test that breaks files works on a copy."""
    from workers.models.radialog_v2.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_backend(tiny_model: tuple[Path, Path]):  # -> RadialogV2Backend (torch imported lazily)
    """The tiny checkpoint loaded on CPU, once per module. make-tiny's model is lively (labels vary with the
    image, answers end at different lengths), so batched-vs-alone comparisons on it can fail."""
    from workers.models.radialog_v2.backend import load_radialog_v2

    return load_radialog_v2(*tiny_model, device="cpu")


@pytest.fixture(scope="module")
def clear(tiny_backend) -> list[int]:  # type: ignore[no-untyped-def]
    """Seeds of ``tests.support.lively_model.image`` whose labels are clear of the threshold (at least 12)."""
    from tests.support.lively_model import clear_seeds

    return clear_seeds(tiny_backend)
