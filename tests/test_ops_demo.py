"""Issue 20's "done when": after `radialog demo --serve` (Orthanc, node, worker with the tiny model, API) and a
few approvals through the page, the operations page shows every chart with the API's real values.

Screenshot: test-artifacts/ops-demo.png.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from composition.chain import orthanc_available
from tests.support.brokers import redis_url
from tests.support.processes import Process, radialog_env
from tests.test_ops_page import check_ops_page
from tests.test_page import give_verdicts, signed_in

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not orthanc_available(), reason="needs Debian's orthanc + orthanc-python"),
]


class Demo(Process):
    """`radialog demo --serve` in a subprocess, its output in ``<tmp_path>/demo.log``."""

    def __init__(self, tmp_path: Path) -> None:
        env = radialog_env(
            {"RADIALOG_DATA_DIR": tmp_path / "var", "RADIALOG_BROKER_URL": redis_url(__name__)}
        )  # the demo uses its own database there
        super().__init__(
            "demo", [sys.executable, "-m", "composition.cli", "demo", "--serve", "--timeout", "600"], env, tmp_path
        )

    @property
    def lines(self) -> list[str]:
        return self.output().splitlines()

    def stop(self, timeout: float = 120.0) -> None:
        """Ctrl-C (SIGINT to the demo alone): the demo stops Orthanc and `radialog run` itself."""
        if self.running:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def test_operations_page_after_the_demo_with_approvals(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    demo = Demo(tmp_path)
    try:
        page_line = demo.wait_for_output(r"Radiologist page: (http://\S+)/\s+\(API key: (\S+)\)", 900)
        base, rad_key = page_line.group(1), page_line.group(2)
        admin_key = demo.wait_for_output(r"admin API key: (\S+);", 60).group(1)
        assert any(re.search(r"\(\d/3 finished\)", line) for line in demo.lines)  # the demo's progress
        assert any(line.startswith("starting: Orthanc + radialog run") and " done in " in line for line in demo.lines)
        studies = httpx.get(f"{base}/api/v1/studies", headers={"Authorization": f"Bearer {rad_key}"}).json()["items"]
        reported = [s["id"] for s in studies if s["latest_report_version"]]
        assert len(reported) == 2
        with signed_in(base, rad_key) as page:
            # the first draft signed as it is; the second edited, then signed
            for index, study in enumerate(reported):
                page.locator(f'#worklist tr[data-study-id="{study}"]').click()
                expect(page.locator("#findings-text")).to_have_attribute("data-version", "1")
                if index == 1:
                    page.click("#edit-summary")
                    page.fill("#edit-findings", "Heart size normal. No pleural effusion. No pneumothorax.")
                    page.click("#save-edit")
                    expect(page.locator("#findings-text")).to_have_attribute("data-version", "2")
                give_verdicts(page)
                page.click("#approve")
                expect(page.locator("#report-banner")).to_contain_text("Verified by")
        with signed_in(base, admin_key) as page:
            figures = check_ops_page(page, base, admin_key, "ops-demo.png")
    finally:
        demo.stop()
    overview, agreement = figures["overview"], figures["agreement"]
    states = {s: sum(h["counts"].get(s, 0) for h in overview["studies_per_hour"]) for s in overview["states"]}
    assert states["SKIPPED"] == 1 and states["REPORTED"] + states["EXPORTED"] == 2
    assert overview["latency"]["image_to_sr"]["n"] == 2 and overview["latency"]["image_to_pacs"]["n"] == 2
    assert overview["not_reported"] == [{"state": "SKIPPED", "reason": "lateral view only", "count": 1}]
    assert overview["workers"]["ready"] and all(w["slots"] for w in overview["workers"]["ready"])
    assert overview["queues"]["available"]
    drafts = agreement["drafts"]
    assert (drafts["approved"], drafts["unchanged"], drafts["edited"], drafts["with_checklist"]) == (2, 1, 1, 2)
    assert {f["n"] for f in agreement["findings"]} == {2} and len(agreement["findings"]) == 14
