"""Where tests find Redis: one database per test module, on the server named by ``RADIALOG_TEST_REDIS``.

Several checkouts may run their suites on one machine at once (flushdb in one would wipe another's
queues): each sets ``RADIALOG_TEST_REDIS=127.0.0.1:<its own port>`` with a redis-server of its own.

Within one run, a module's leftovers (queued tasks, readiness keys) must never reach another module's worker,
so every module that talks to Redis is listed in ``DATABASES`` and asks for its URL by name
(``redis_url(__name__)``): a database number is written once, here, and an unlisted module cannot get one.
Redis has 16 databases and more modules than that need one, so the API-only modules (they send tasks that
nobody consumes, and never start a worker) share ``SHARED_DB``; ``tests/conftest.py`` empties it before each
of their tests. Every other database has exactly one owner (checked when this module is imported).
"""

from __future__ import annotations

import os

from composition.demo import DEMO_REDIS_DB

TEST_REDIS = os.environ.get("RADIALOG_TEST_REDIS", "127.0.0.1:6379")

#: Redis databases of a default server.
DATABASE_COUNT = 16
#: The database of the API-only modules: emptied before each of their tests.
SHARED_DB = 0

#: Test module -> its Redis database.
DATABASES: dict[str, int] = {
    **dict.fromkeys(
        (
            "tests.test_api",
            "tests.test_api_channels",
            "tests.test_api_hostile",
            "tests.test_api_refusals",
            "tests.test_api_schema",
            "tests.test_monitoring",
            "tests.test_ops_page",
            "tests.test_presence",
            "tests.test_quality",
        ),
        SHARED_DB,
    ),
    "tests.test_api_dialog": 1,
    "tests.test_api_fuzz": 2,
    "tests.test_compose": 3,
    "tests.test_e2e": 4,
    "tests.test_e2e_channels": 5,
    "tests.test_e2e_radialog_v1": 6,
    "tests.test_e2e_xraygpt": 7,
    # `radialog demo` always uses DEMO_REDIS_DB of the server it is given and empties it when it starts;
    # both demo modules run it, one test after the other.
    "tests.test_demo": DEMO_REDIS_DB,
    "tests.test_ops_demo": DEMO_REDIS_DB,
    "tests.test_hostile_text": 9,
    "tests.test_page": 10,
    "tests.test_phi_logs": 11,
    "tests.test_pipeline": 12,
    "tests.test_priority_e2e": 13,
    "tests.test_worker_crashes": 14,
    "tests.test_workers": 15,
}
#: Databases more than one module may use, and why that is safe.
SHARED = {
    SHARED_DB: "API-only modules, emptied before each test",
    DEMO_REDIS_DB: "the demo's own database, emptied by the demo when it starts",
}


class DuplicateDatabase(AssertionError):
    """Two test modules were given one Redis database that is not declared shared."""


def check_assignments(databases: dict[str, int]) -> None:
    """Every database exists on a default server and has one owner, unless it is declared shared."""
    owners: dict[int, list[str]] = {}
    for module, db in databases.items():
        if not 0 <= db < DATABASE_COUNT:
            raise DuplicateDatabase(f"{module}: database {db} is not one of the server's {DATABASE_COUNT}")
        owners.setdefault(db, []).append(module)
    for db, modules in owners.items():
        if len(modules) > 1 and db not in SHARED:
            raise DuplicateDatabase(f"Redis database {db} is given to {', '.join(sorted(modules))}")


check_assignments(DATABASES)


def redis_db(module: str) -> int:
    """The Redis database of test module ``module`` (its ``__name__``)."""
    try:
        return DATABASES[module]
    except KeyError:
        raise KeyError(f"{module} has no Redis database: add it to DATABASES in tests/support/brokers.py") from None


def redis_url(module: str) -> str:
    """The URL of ``module``'s database on the test Redis server (call it with ``__name__``)."""
    return f"redis://{TEST_REDIS}/{redis_db(module)}"


def flushed_per_test(module: str) -> bool:
    """Whether ``module`` shares the per-test-emptied database (conftest empties it before each test)."""
    return DATABASES.get(module) == SHARED_DB
