"""Waiting in tests: one ``wait_for`` instead of a ``time.sleep`` loop in every module."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What a test waited for did not happen in time (an assertion failure: the test fails, not errors)."""


def wait_for(
    predicate: Callable[[], T],
    *,
    what: str,
    timeout: float = 60.0,
    interval: float = 0.1,
    check: Callable[[], None] | None = None,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    ``check`` runs after each miss and raises when waiting is pointless (a process we wait on died);
    ``details`` adds context (a log tail) to the ``WaitTimeout`` raised after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)
