"""The seams between the packages (docs/ARCHITECTURE.md, "Layers"): the import contract holds and can fail, the
product has no ImportError guards around its own packages, shared names are spelled once, and ``radialog run``
stops with the error when one of its parts cannot be imported."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("radialog", "dicom_node", "reporting", "workers", "api", "composition")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_import_contract_holds() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("dicom_node/cli.py", "from workers.pipeline import run_report_job", "dicom_node.cli -> workers.pipeline"),
        ("api/routes/studies.py", "import torch", "api.routes.studies -> torch"),
        ("radialog/settings.py", "from reporting import text", "radialog.settings -> reporting"),
        ("workers/pipeline.py", "from tests.support import brokers", "workers.pipeline -> tests.support.brokers"),
        ("bench/api.py", "from tests.support import seeding", "bench.api -> tests.support.seeding"),
    ],
)
def test_the_import_contract_fails_on_a_forbidden_import(tmp_path: Path, module: str, line: str, expected: str) -> None:
    """The same check on a copy of the tree with one forbidden import added: it must break, naming the import."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "fixtures")
    for package in (*PRODUCT, "bench", "tests"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-4000:]
    assert "BROKEN" in result.stdout and expected in result.stdout, result.stdout[-4000:]


def _product_modules() -> Iterator[tuple[Path, ast.Module]]:
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def test_no_import_error_guards_in_the_product() -> None:
    """Every product package ships in the same wheel: an import that fails is a broken install and must fail
    loudly, never be logged and skipped (a broken pynetdicom once made `radialog run` carry on without a node)."""
    guards = []
    for path, tree in _product_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                if names & {"ImportError", "ModuleNotFoundError"}:
                    guards.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert guards == []


def test_shared_names_are_spelled_once() -> None:
    """Queue and task names, the readiness key and "is the broker Redis" live in the kernel; a second spelling
    would drift (a renamed task that the API still sends under the old name is lost)."""
    owners = {
        "radialog.report": "radialog/messaging.py",
        "radialog.dialog_turn": "radialog/messaging.py",
        "radialog.export": "radialog/messaging.py",
        "rediss://": "radialog/messaging.py",
        "radialog:worker:": "radialog/presence.py",
    }
    found: dict[str, set[str]] = {name: set() for name in owners}
    for path, tree in _product_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in owners:
                found[node.value].add(str(path.relative_to(ROOT)))
    assert found == {name: {owner} for name, owner in owners.items()}


def test_radialog_run_fails_loudly_when_a_part_cannot_be_imported(tmp_path: Path) -> None:
    """A broken pynetdicom install: `radialog run` must exit with the import error, not log "no DICOM listener"
    and serve without a node."""
    broken = tmp_path / "broken" / "pynetdicom"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("pynetdicom is broken on purpose (test)")\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(broken.parent), str(ROOT)]),
            "RADIALOG_DATA_DIR": str(tmp_path / "var"),
            "RADIALOG_BROKER_URL": "redis://127.0.0.1:1/0",
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "composition.cli", "run", "--no-api", "--dicom-port", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "pynetdicom is broken on purpose" in output, output[-3000:]
    assert "no DICOM listener" not in output
    assert "worker starting" not in output
