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


def _processes_mentioning(text: str) -> list[int]:
    """Our processes whose command line or environment mentions ``text`` (the demo's work directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            seen = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in seen:
            pids.append(int(proc.name))
    return pids


def _answers(url: str) -> bool:
    import httpx

    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.TransportError:
        return False


def test_demo_serve_stopped_by_sigterm_stops_orthanc_and_radialog_run(tmp_path: Path) -> None:
    """`radialog demo --serve` under a service manager: SIGTERM must end Orthanc and `radialog run` as
    Ctrl-C does (they run in sessions of their own, so nothing else would reach them)."""
    import re
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
    env["RADIALOG_DATA_DIR"] = str(tmp_path / "var")
    env["RADIALOG_BROKER_URL"] = "redis://127.0.0.1:1/0"  # the embedded broker: nothing to share with others
    demo = subprocess.Popen([sys.executable, "-m", "radialog.cli", "demo", "--serve", "--timeout", "600"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = ""
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            out += line
            if "Serving until Ctrl-C" in line:
                break
        assert "Serving until Ctrl-C" in out, out[-3000:]
        [api_url] = re.findall(r"Radiologist page: (http://127\.0\.0\.1:\d+)/", out)
        orthanc_urls = set(re.findall(r"SR in Orthanc: (http://127\.0\.0\.1:\d+)/", out))
        children = _processes_mentioning(str(tmp_path))
        assert children and _answers(f"{api_url}/healthz")
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=120) == 0, out[-3000:]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _processes_mentioning(str(tmp_path)):
            time.sleep(0.5)
        assert _processes_mentioning(str(tmp_path)) == []
        assert not _answers(f"{api_url}/healthz") and not any(_answers(f"{url}/system") for url in orthanc_urls)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in _processes_mentioning(str(tmp_path)):  # left by a failing run: ours, end them by id
            os.kill(pid, signal.SIGKILL)
