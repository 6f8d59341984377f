"""Seeding for tests: the one seeding API, which lives in ``bench.seeding`` because the benchmarks seed the
same way and bench must not import the tests. See that module for the two ways to add a study."""

from __future__ import annotations

from bench.seeding import (
    FINDINGS_TEXT,
    PROVENANCE,
    USERS,
    add_reported_study,
    add_study,
    add_study_without_history,
    make_keys,
    model_output,
)

__all__ = [
    "FINDINGS_TEXT",
    "PROVENANCE",
    "USERS",
    "add_reported_study",
    "add_study",
    "add_study_without_history",
    "make_keys",
    "model_output",
]
