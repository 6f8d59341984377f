"""Static checks in the suite (issue 18), so the README's test command and CI enforce them: ruff's lint rules
and its formatting on the product packages (the format check also on tests and bench), and mypy on the product
packages, each with the configuration in pyproject.toml. A failure shows the tool's own output. The last test
shows that each check fails on a finding, with the same configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("radialog", "dicom_node", "reporting", "workers", "api", "composition")
PYPROJECT = ROOT / "pyproject.toml"


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout[-8000:] + result.stderr[-2000:]).strip()


def test_ruff_lint_passes() -> None:
    result = _run("ruff", "check", "--no-cache", *PRODUCT)
    assert result.returncode == 0, _output(result)


def test_ruff_format_is_applied() -> None:
    result = _run("ruff", "format", "--check", "--no-cache", *PRODUCT, "tests", "bench")
    assert result.returncode == 0, (
        "run `ruff format " + " ".join((*PRODUCT, "tests", "bench")) + "`:\n" + _output(result)
    )


@pytest.mark.slow
@pytest.mark.timeout(600)  # a cold run (no .mypy_cache) takes 1-2 minutes
def test_mypy_passes() -> None:
    result = _run("mypy", *PRODUCT)
    assert result.returncode == 0, _output(result)


def test_each_check_fails_on_a_finding(tmp_path: Path) -> None:
    """The same tools and configuration on one small module with a finding for each: a blind except (lint),
    code not as ruff formats it, and a str assigned to an int (mypy)."""
    module = tmp_path / "finding.py"
    module.write_text(
        "def answer() -> int:\n"
        "    value: int = 'forty-two'\n"
        "    try:\n"
        "        return value\n"
        "    except Exception:\n"
        "        return  0\n"
    )
    lint = _run("ruff", "check", "--no-cache", "--config", str(PYPROJECT), str(module), cwd=tmp_path)
    assert lint.returncode == 1 and "BLE001" in lint.stdout, _output(lint)
    fmt = _run("ruff", "format", "--check", "--no-cache", "--config", str(PYPROJECT), str(module), cwd=tmp_path)
    assert fmt.returncode == 1 and "would be reformatted" in fmt.stdout + fmt.stderr, _output(fmt)
    types = _run("mypy", "--config-file", str(PYPROJECT), "--no-incremental", str(module), cwd=tmp_path)
    assert types.returncode == 1 and "[assignment]" in types.stdout, _output(types)
