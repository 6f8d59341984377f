"""Issue 19 done-when, every part a real process: storescu -> Orthanc (router plugin, a trusted router) ->
`radialog node` (routing rules) -> `radialog worker` (tiny model) -> the outbox to four channels: Orthanc (SR),
a RIS (MLLP listener from the hl7 library) that refuses at first, a FHIR endpoint and a webhook receiver.
A STAT order is queued HIGH, a child is SKIPPED with the reason, every channel gets each version as the
README says, and the refusing RIS ends DEAD with its reason and is sent by `radialog export retry`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from composition.chain import ORTHANC, PYTHON_PLUGIN, ROOT, Chain, wait_until
from radialog.registry import Export, Registry
from radialog.routing import PEDIATRIC_REASON
from radialog.synthetic import make_cxr
from tests.support.brokers import redis_url
from tests.support.channel_peers import FhirEndpoint, MLLPListener, WebhookReceiver

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not ORTHANC.exists() or not PYTHON_PLUGIN.exists(), reason="needs orthanc + orthanc-python"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="needs dcmtk (storescu)"),
]
SECRET = "webhook-secret-for-the-e2e-test"


@pytest.fixture
def peers() -> Iterator[tuple[MLLPListener, FhirEndpoint, WebhookReceiver]]:
    ris, ehr, hooks = MLLPListener("AR", text="order not found"), FhirEndpoint(), WebhookReceiver(SECRET)
    yield ris, ehr, hooks
    for peer in (ris, ehr, hooks):
        peer.stop()


def _write(ds: Dataset, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_stat_child_and_every_channel_through_the_chain(tmp_path: Path, peers) -> None:  # type: ignore[no-untyped-def]
    from workers.models.radialog_v2.tiny import make_tiny

    ris, ehr, hooks = peers
    model_dir, base_dir = make_tiny(tmp_path / "model")
    database_url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
    destinations = [
        {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port},
        {"name": "ehr", "kind": "fhir", "url": ehr.url},
        {"name": "hooks", "kind": "webhook", "url": hooks.url, "secret": SECRET},
    ]
    chain = Chain(
        tmp_path / "chain",
        database_url=database_url,
        redis_url=redis_url(__name__),
        model_dir=model_dir,
        base_model_dir=base_dir,
        stable_after=30.0,
        extra_env={"RADIALOG_TRUSTED_ROUTERS": json.dumps(["ORTHANC"]), "RADIALOG_EXPORT_MAX_ATTEMPTS": "2"},
    )
    chain.env["RADIALOG_DESTINATIONS"] = json.dumps(json.loads(chain.env["RADIALOG_DESTINATIONS"]) + destinations)
    with chain:
        routine = make_cxr(patient_index=920001)
        child = make_cxr(patient_index=920002)
        child.PatientAge = "006Y"
        stat = make_cxr(patient_index=920003)
        item = Dataset()
        item.RequestedProcedurePriority = "STAT"
        stat.RequestAttributesSequence = [item]
        for ds in (routine, child, stat):
            assert chain.storescu([_write(ds, tmp_path / "in")]).returncode == 0

        # stable_after is 30 s: only the trusted router's release makes these move in time
        skipped = chain.wait_state(str(child.AccessionNumber), {"SKIPPED", "QUEUED", "REPORTED", "EXPORTED"})
        assert (skipped["state"], skipped["reason"]) == ("SKIPPED", PEDIATRIC_REASON)
        urgent = chain.wait_state(str(stat.AccessionNumber), {"REPORTED", "EXPORTED", "FAILED"})
        assert urgent["priority"] == "HIGH" and urgent["routing_rule"] == "stat-order", urgent
        normal = chain.wait_state(str(routine.AccessionNumber), {"REPORTED", "EXPORTED", "FAILED"})
        assert normal["priority"] == "ROUTINE"

        # the radiologist approves the STAT study as shown
        report = chain.api("GET", f"/api/v1/studies/{urgent['id']}/report").json()
        approved = chain.api(
            "POST",
            f"/api/v1/studies/{urgent['id']}/report/approve",
            json={
                "findings_text": report["findings_text"],
                "impression_text": report["impression_text"] or "",
                "base_version": 1,
            },
        )
        assert approved.status_code == 201, approved.text

        registry = Registry(database_url)
        try:

            def ris_rows() -> list[Export]:
                with registry.session() as session:
                    rows = list(session.scalars(select(Export).where(Export.destination == "ris")))
                    session.expunge_all()
                    return rows

            dead = wait_until(
                lambda: (rows := ris_rows()) and len(rows) == 3 and all(r.state == "DEAD" for r in rows) and rows,
                240,
                "the RIS rows DEAD",
                chain.check_alive,
            )
            assert all("AR" in r.last_error and "order not found" in r.last_error for r in dead)

            # the RIS is fixed; the operator re-arms its rows and sends what is due
            ris.answer = "AA"
            for row in dead:
                retried = subprocess.run(
                    [sys.executable, "-m", "composition.cli", "export", "retry", str(row.id)],
                    env=chain.env,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
                assert retried.returncode == 0, retried.stderr
            subprocess.run(
                [sys.executable, "-m", "composition.cli", "export", "send-due"],
                env=chain.env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            assert all(r.state == "SENT" for r in ris_rows())
        finally:
            registry.dispose()

        # what each channel got, per version (README: Output channels)
        accepted: dict[str, list[str]] = {}
        for message in ris.messages:  # refused attempts included: the same statuses, sent again
            accepted.setdefault(str(message.segment("OBR")(3)), []).append(str(message.segment("OBR")(25)))
        assert set(accepted[str(stat.AccessionNumber)]) == {"P", "F"}
        assert set(accepted[str(routine.AccessionNumber)]) == {"P"}
        assert str(child.AccessionNumber) not in accepted
        statuses = sorted(r["status"] for r in ehr.history)
        assert statuses.count("final") == 1 and statuses.count("preliminary") >= 2
        events = sorted(e["type"] for e in hooks.events().values())
        assert events.count("study.reported") == 2 and events.count("report.approved") == 1
        assert events.count("export.dead") == 3
        srs = wait_until(lambda: len(chain.orthanc_srs(str(stat.StudyInstanceUID))) == 2, 120, "both SRs in Orthanc")
        assert srs
