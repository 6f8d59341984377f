"""Pieces issue 18 found re-spelled across the packages exist once (the queue/task names, the readiness key and
"is the broker Redis" are pinned in tests/test_architecture.py): a second copy drifts silently, e.g. an
exporter that reads "the newest version" one way and the API another.

Each check walks the product's syntax trees and names every place the piece is spelled."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("radialog", "dicom_node", "reporting", "workers", "api", "composition", "bench")


def _nodes() -> Iterator[tuple[str, ast.AST]]:
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(), filename=where)):
                yield where, node


def _places(matches: Callable[[ast.AST], bool]) -> set[str]:
    return {where for where, node in _nodes() if matches(node)}


def _is_attribute(node: ast.AST, name: str, owner: str) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == name
        and isinstance(node.value, ast.Name)
        and node.value.id == owner
    )


def test_the_newest_report_version_is_asked_in_the_registry_only() -> None:
    """``Report.version.desc()`` (ordering a study's versions newest first) only in radialog.registry.queries."""

    def newest_first(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "desc"
            and _is_attribute(node.func.value, "version", "Report")
        )

    assert _places(newest_first) == {"radialog/registry/queries.py"}


def test_the_seed_question_is_built_in_the_capabilities_only() -> None:
    """The report question with the seed's present findings: ``Capabilities.seed_question``; nobody else
    calls ``report_question`` (the API's token estimate and the worker's history would drift apart)."""

    def calls_report_question(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "report_question"
        )

    assert _places(calls_report_question) == {"workers/models/capabilities.py"}


def test_radialog_image_token_count_is_one_constant() -> None:
    """RaDialog v2's 196 image positions: ``workers.models.prompts.IMAGE_TOKENS``; everything else imports it."""
    assert _places(lambda n: isinstance(n, ast.Constant) and type(n.value) is int and n.value == 196) == {
        "workers/models/prompts.py"
    }


def test_which_destinations_take_the_sr_is_said_once() -> None:
    """("dimse", "stow") as a literal only in radialog/settings.py (``SR_KINDS``, ``Destination.carries_sr``)."""

    def sr_kinds(node: ast.AST) -> bool:
        return isinstance(node, ast.Tuple | ast.List | ast.Set) and {"dimse", "stow"} <= {
            e.value for e in node.elts if isinstance(e, ast.Constant)
        }

    assert _places(sr_kinds) == {"radialog/settings.py"}
