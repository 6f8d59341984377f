"""Shared fixtures: settings in a temporary data directory, and the registry on SQLite and PostgreSQL.

PostgreSQL is the machine's real server (127.0.0.1:5432, database ``test``, trust auth); each test
gets its own schema so tests never see each other's rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from radialog.registry import Registry
from radialog.registry.db import temporary_schema
from radialog.settings import Settings

PG_URL = os.environ.get("RADIALOG_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


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
