"""The README's first command: `radialog demo` runs the whole chain and ends with reports in a PACS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from radialog.chain import orthanc_available
from tests.reporting_support import dciodvfy_errors
from tests.support.brokers import redis_url

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.mark.skipif(not orthanc_available(), reason="needs Debian's orthanc + orthanc-python (./scripts/setup)")
@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_demo_ends_with_reports_in_orthanc(tmp_path: Path, broker: str) -> None:
    """With Redis on 127.0.0.1, and without it (nothing listens on port 1: the embedded broker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
    env["RADIALOG_DATA_DIR"] = str(tmp_path / "var")
    # the demo uses database 8 of the broker's Redis server: the test server's (tests/support/brokers.py)
    env["RADIALOG_BROKER_URL"] = "redis://127.0.0.1:1/0" if broker == "embedded" else redis_url(0)
    result = subprocess.run(
        [sys.executable, "-m", "radialog.cli", "demo", "--timeout", "600"],
        env=env, capture_output=True, text=True, timeout=840, check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "TINY RANDOM" in result.stderr  # the tiny model is announced loudly
    assert out.count("SR in Orthanc: http://127.0.0.1:") == 2  # both chest studies, in the PACS
    assert out.count("AI DRAFT - NOT VERIFIED") == 2
    assert "DX lateral only: SKIPPED" in out and "reason: lateral view only" in out
    # every SR the demo wrote (the tiny model's drafts, whatever it says) is valid DICOM for dicom3tools
    srs = sorted((tmp_path / "var" / "demo" / "chain" / "var" / "sr").rglob("*.dcm"))
    assert len(srs) == 2 and all(dciodvfy_errors(path) == [] for path in srs)
    run_log = (tmp_path / "var" / "demo" / "chain" / "run.log").read_text()
    assert ("using the embedded SQLite broker" in run_log) == (broker == "embedded")
