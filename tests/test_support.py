"""The test kit's own guarantees: no exported RADIALOG_* reaches a test, and no two test modules share a Redis
database unless it is declared shared (and then it is emptied before each test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from radialog.settings import Settings
from tests.support import brokers

ROOT = Path(__file__).resolve().parents[1]


def test_settings_never_see_exported_product_variables() -> None:
    """Run under ``test_exported_variables_are_cleared`` with RADIALOG_* exported (alone it passes trivially)."""
    assert [k for k in os.environ if k.startswith("RADIALOG_") and not k.startswith("RADIALOG_TEST_")] == []
    assert Settings().database_url is None
    assert "6399" not in Settings().broker_url


def test_exported_variables_are_cleared(tmp_path: Path) -> None:
    """A pytest run with a developer's exports: the in-process Settings() still gets the defaults, while the
    suite's own RADIALOG_TEST_* configuration stays."""
    env = {
        **os.environ,
        "RADIALOG_DATABASE_URL": f"sqlite:///{tmp_path}/developer.sqlite",
        "RADIALOG_BROKER_URL": "redis://127.0.0.1:6399/3",
        "RADIALOG_TEST_REDIS": brokers.TEST_REDIS,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_support.py::test_settings_never_see_exported_product_variables",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout


def test_every_redis_database_has_one_owner_unless_declared_shared() -> None:
    brokers.check_assignments(brokers.DATABASES)
    with pytest.raises(brokers.DuplicateDatabase, match="tests.test_a, tests.test_b"):
        brokers.check_assignments({"tests.test_a": 5, "tests.test_b": 5})
    with pytest.raises(brokers.DuplicateDatabase, match="not one of"):
        brokers.check_assignments({"tests.test_a": 16})
    with pytest.raises(KeyError, match="no Redis database"):
        brokers.redis_url("tests.test_unlisted")


def test_every_module_that_uses_redis_is_listed() -> None:
    """A module calling ``redis_url(__name__)`` without an entry would only fail when it runs."""
    users = {
        f"tests.{path.stem}"
        for path in (ROOT / "tests").glob("test_*.py")
        if path.name != "test_support.py" and "redis_url(__name__)" in path.read_text()
    }
    assert users <= set(brokers.DATABASES), sorted(users - set(brokers.DATABASES))
