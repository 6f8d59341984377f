"""The export outbox against real peers: Orthanc (stored in the image's study, survives Orthanc being down,
exactly one instance), pynetdicom SCPs that refuse the SOP class or answer a failure status (DEAD with the
reason), concurrent deliveries (one C-STORE), and the `radialog export` command."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from radialog.registry import Export, Registry, Study, utcnow
from radialog.settings import Destination, Settings
from reporting.export import backoff_seconds, deliver, deliver_due, due_exports
from reporting.sr import AI_SERIES_DESCRIPTION
from reporting.versions import create_ai_draft, create_version
from tests.support.dicom_peers import StorePeer
from tests.support.orthanc import OrthancServer, orthanc  # noqa: F401 - the fixture
from tests.support.seeding import PROVENANCE, add_study_without_history, model_output


def _fast(settings: Settings, destinations: list[Destination], attempts: int = 3) -> Settings:
    """Retries without waiting, so a test walks through every attempt at once."""
    return settings.model_copy(
        update={
            "destinations": destinations,
            "export_max_attempts": attempts,
            "export_backoff_initial": 0.0,
            "export_backoff_max": 0.0,
            "acse_timeout": 5.0,
            "dimse_timeout": 10.0,
            "network_timeout": 10.0,
        }
    )


def _draft(registry: Registry, settings: Settings) -> tuple[int, object, list[int]]:
    study_id, source = add_study_without_history(registry, settings)
    with registry.session() as session:
        report = create_ai_draft(session, settings, study_id, model_output(study_id), PROVENANCE)
        ids = [e.id for e in report.exports] or list(
            session.scalars(select(Export.id).where(Export.report_id == report.id).order_by(Export.id))
        )
    return study_id, source, ids


def _export(registry: Registry, export_id: int) -> Export:
    with registry.session() as session:
        return session.get(Export, export_id)


def _state(registry: Registry, study_id: int) -> str:
    with registry.session() as session:
        return session.get(Study, study_id).state


def orthanc_destination(server: OrthancServer) -> Destination:
    return Destination(name="orthanc", ae_title=server.aet, host="127.0.0.1", port=server.dicom_port)


def test_sr_lands_in_the_image_study_in_orthanc(
    sqlite_registry: Registry,
    settings: Settings,
    orthanc: OrthancServer,
    tmp_path: Path,  # noqa: F811
) -> None:
    settings = _fast(settings, [orthanc_destination(orthanc)])
    study_id, source, [export_id] = _draft(sqlite_registry, settings)
    image = tmp_path / "image.dcm"
    source.save_as(image, enforce_file_format=True)
    orthanc.upload(image)

    assert deliver(sqlite_registry, settings, export_id) == "SENT"
    row = _export(sqlite_registry, export_id)
    assert (row.state, row.attempts, row.last_error) == ("SENT", 1, None) and row.sent_at is not None
    assert _state(sqlite_registry, study_id) == "EXPORTED"

    series = {s["MainDicomTags"]["Modality"]: s for s in orthanc.study_series(source.StudyInstanceUID)}
    assert set(series) == {"CR", "SR"}
    assert series["SR"]["MainDicomTags"]["SeriesDescription"] == AI_SERIES_DESCRIPTION
    with sqlite_registry.session() as session:
        sop_uid = session.get(Export, export_id).report.sop_instance_uid
    tags = orthanc.instance_tags(sop_uid)
    assert tags["VerificationFlag"] == "UNVERIFIED" and tags["StudyInstanceUID"] == source.StudyInstanceUID

    # delivering again is a no-op; a new version re-opens the study until it is sent too
    assert deliver(sqlite_registry, settings, export_id) == "skipped: sent"
    with sqlite_registry.session() as session:
        approved = create_version(
            session,
            settings,
            study_id,
            kind="approval",
            findings_text="Cardiomegaly.",
            impression_text=None,
            author="anna",
            approve=True,
        )
        new_export = approved.exports[0].id
    assert _state(sqlite_registry, study_id) == "REPORTED"
    assert deliver(sqlite_registry, settings, new_export) == "SENT"
    assert _state(sqlite_registry, study_id) == "EXPORTED"
    assert orthanc.instance_tags(approved.sop_instance_uid)["VerificationFlag"] == "VERIFIED"


def test_orthanc_down_then_up_delivers_exactly_once(
    sqlite_registry: Registry,
    settings: Settings,
    orthanc: OrthancServer,  # noqa: F811
) -> None:
    settings = _fast(settings, [orthanc_destination(orthanc)], attempts=40)
    orthanc.stop()
    study_id, _, [export_id] = _draft(sqlite_registry, settings)
    for _ in range(3):  # the PACS is down: each attempt fails, is recorded, and stays PENDING
        assert deliver(sqlite_registry, settings, export_id) == "PENDING"
    row = _export(sqlite_registry, export_id)
    assert row.attempts == 3 and "no association" in row.last_error
    assert _state(sqlite_registry, study_id) == "REPORTED"

    orthanc.start()
    with sqlite_registry.session() as session:
        assert due_exports(session, utcnow()) == [export_id]
    assert deliver_due(sqlite_registry, settings) == {export_id: "SENT"}
    assert deliver_due(sqlite_registry, settings) == {}
    assert orthanc.count_instances() == 1
    assert _state(sqlite_registry, study_id) == "EXPORTED"


def test_refused_sop_class_goes_dead_with_the_reason(registry: Registry, settings: Settings) -> None:
    peer = StorePeer(ae_title="CTONLY", accept=CTImageStorage)
    try:
        settings = _fast(settings, [peer.destination("ct-only")], attempts=3)
        study_id, _, [export_id] = _draft(registry, settings)
        assert [deliver(registry, settings, export_id) for _ in range(3)] == ["PENDING", "PENDING", "DEAD"]
        row = _export(registry, export_id)
        assert row.state == "DEAD" and row.attempts == 3 and row.next_attempt_at is None
        assert "refused the SOP class Comprehensive SR Storage" in row.last_error
        assert "no accepted presentation context" in row.last_error
        assert deliver(registry, settings, export_id) == "skipped: dead"
        assert peer.received == [] and _state(registry, study_id) == "REPORTED"
    finally:
        peer.stop()


def test_failure_status_goes_dead_and_retry_rearms(
    sqlite_registry: Registry, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = StorePeer(ae_title="FULL", status=0xA700)
    try:
        settings = _fast(settings, [peer.destination("full")], attempts=2)
        _, _, [export_id] = _draft(sqlite_registry, settings)
        assert [deliver(sqlite_registry, settings, export_id) for _ in range(2)] == ["PENDING", "DEAD"]
        row = _export(sqlite_registry, export_id)
        assert "failure status 0xA700" in row.last_error and "Out of Resources" in row.last_error
        assert len(peer.received) == 2

        # ops: list the dead row, re-arm it, send what is due (the peer now accepts)
        from radialog import settings as settings_module
        from reporting.cli import export

        monkeypatch.setenv("RADIALOG_DATA_DIR", str(settings.data_dir))
        monkeypatch.setenv("RADIALOG_DESTINATIONS", f"[{peer.destination('full').model_dump_json()}]")
        settings_module.get_settings.cache_clear()
        try:
            runner = CliRunner()
            listed = runner.invoke(export, ["list", "--state", "DEAD"])
            assert listed.exit_code == 0 and "0xA700" in listed.output
            header, row = listed.output.splitlines()[:2]  # an aligned table: the id under its header
            assert header.split()[:2] == ["id", "study"] and row.split()[0] == str(export_id)
            assert row.index("DEAD") == header.index("state")
            assert runner.invoke(export, ["retry", str(export_id)]).exit_code == 0
            peer.status = 0x0000
            sent = runner.invoke(export, ["send-due"])
            assert sent.exit_code == 0 and f"export {export_id}: SENT" in sent.output
            assert runner.invoke(export, ["retry", str(export_id)]).exit_code != 0  # already sent
        finally:
            settings_module.get_settings.cache_clear()
        assert _export(sqlite_registry, export_id).state == "SENT"
    finally:
        peer.stop()


def test_concurrent_deliveries_send_once(registry: Registry, settings: Settings) -> None:
    peer = StorePeer(ae_title="COUNT")
    try:
        settings = _fast(settings, [peer.destination("count")])
        study_id, _, [export_id] = _draft(registry, settings)
        outcomes: list[str] = []
        barrier = threading.Barrier(4)

        def run() -> None:
            barrier.wait()
            outcomes.append(deliver(registry, settings, export_id))

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes).count("SENT") == 1
        assert all(o == "SENT" or o.startswith("skipped") for o in outcomes)
        assert len(peer.received) == 1 and _state(registry, study_id) == "EXPORTED"
    finally:
        peer.stop()


def test_study_is_exported_only_when_every_destination_accepted(sqlite_registry: Registry, settings: Settings) -> None:
    good, bad = StorePeer(ae_title="GOOD"), StorePeer(ae_title="BAD", status=0xC000)
    try:
        settings = _fast(settings, [good.destination("good"), bad.destination("bad")], attempts=5)
        study_id, _, export_ids = _draft(sqlite_registry, settings)
        outcomes = {deliver(sqlite_registry, settings, export_id) for export_id in export_ids}
        assert outcomes == {"SENT", "PENDING"}
        assert _state(sqlite_registry, study_id) == "REPORTED"
        bad.status = 0x0000
        assert set(deliver_due(sqlite_registry, settings).values()) == {"SENT"}
        assert _state(sqlite_registry, study_id) == "EXPORTED"
    finally:
        good.stop()
        bad.stop()


def test_backoff_doubles_up_to_the_cap_with_jitter(settings: Settings) -> None:
    settings = settings.model_copy(update={"export_backoff_initial": 5.0, "export_backoff_max": 600.0})
    rng = random.Random(1)
    for attempt, ceiling in [(1, 5.0), (2, 10.0), (5, 80.0), (8, 600.0), (30, 600.0)]:
        delay = backoff_seconds(settings, attempt, rng)
        assert ceiling / 2 <= delay <= ceiling
    total = sum(backoff_seconds(settings, a, rng) for a in range(1, settings.export_max_attempts + 1))
    assert total > 3 * 3600  # the default budget keeps retrying for hours


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="Orthanc's DICOMweb plugin (orthanc-dicomweb) is missing")
def test_stow_rs_destination_with_orthanc_down_then_up(
    sqlite_registry: Registry, settings: Settings, tmp_path: Path
) -> None:
    server = OrthancServer(
        tmp_path / "orthanc-web",
        {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}},
    )
    destination = Destination(name="web", kind="stow", url=f"{server.url}/dicom-web")
    settings = _fast(settings, [destination], attempts=5)
    study_id, source, [export_id] = _draft(sqlite_registry, settings)
    try:
        assert deliver(sqlite_registry, settings, export_id) == "PENDING"  # not started yet: down
        assert "STOW-RS to" in _export(sqlite_registry, export_id).last_error
        server.start()
        assert deliver(sqlite_registry, settings, export_id) == "SENT"
        with sqlite_registry.session() as session:
            sop_uid = session.get(Export, export_id).report.sop_instance_uid
        assert server.instance_tags(sop_uid)["StudyInstanceUID"] == source.StudyInstanceUID
        assert server.count_instances() == 1 and _state(sqlite_registry, study_id) == "EXPORTED"
    finally:
        server.stop()


def test_tls_destination_verifies_the_peer_and_presents_our_certificate(
    sqlite_registry: Registry, settings: Settings, tmp_path: Path
) -> None:
    import ssl

    from radialog.settings import TLSSettings
    from tests.support.dicom_peers import self_signed

    peer_cert, peer_key = self_signed(tmp_path, "pacs")
    our_cert, our_key = self_signed(tmp_path, "radialog")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(our_cert))
    server_context.verify_mode = ssl.CERT_REQUIRED  # the PACS wants to know who stores
    server_context.load_cert_chain(str(peer_cert), str(peer_key))
    peer = StorePeer(ae_title="TLSPACS", ssl_context=server_context)
    try:
        trusted = peer.destination("tls").model_copy(
            update={"tls": TLSSettings(certfile=our_cert, keyfile=our_key, ca_file=peer_cert)}
        )
        untrusting = trusted.model_copy(
            update={"name": "wrong-ca", "tls": TLSSettings(certfile=our_cert, keyfile=our_key, ca_file=our_cert)}
        )
        settings = _fast(settings, [trusted, untrusting], attempts=1)
        _, _, export_ids = _draft(sqlite_registry, settings)
        outcomes = {_export(sqlite_registry, i).destination: deliver(sqlite_registry, settings, i) for i in export_ids}
        assert outcomes == {"tls": "SENT", "wrong-ca": "DEAD"}  # a PACS we cannot verify gets nothing
        assert len(peer.received) == 1
    finally:
        peer.stop()


def test_a_sender_that_never_reports_back_ends_dead_too(registry: Registry, settings: Settings) -> None:
    """Attempts are counted at the claim: a sender killed mid-send every time still exhausts the budget."""
    fast = _fast(settings, [Destination(name="pacs", port=1)], attempts=2)
    _study_id, _source, [export_id] = _draft(registry, fast)
    with registry.session() as session:  # two claims whose sender died before recording anything
        row = session.get(Export, export_id)
        row.attempts, row.next_attempt_at = 2, utcnow()
    assert deliver(registry, fast, export_id) == "DEAD"
    dead = _export(registry, export_id)
    assert dead.state == "DEAD" and "never reported back" in (dead.last_error or "")
    assert dead.attempts == 2  # no third send
