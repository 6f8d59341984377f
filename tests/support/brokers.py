"""Where tests find Redis: one database per test module, on the server named by ``RADIALOG_TEST_REDIS``.

Several checkouts may run their suites on one machine at once (flushdb in one would wipe another's
queues): each sets ``RADIALOG_TEST_REDIS=127.0.0.1:<its own port>`` with a redis-server of its own.
"""

from __future__ import annotations

import os

TEST_REDIS = os.environ.get("RADIALOG_TEST_REDIS", "127.0.0.1:6379")


def redis_url(db: int) -> str:
    """The URL of database ``db`` on the test Redis server."""
    return f"redis://{TEST_REDIS}/{db}"
