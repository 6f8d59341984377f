"""HL7 ORU^R01 over MLLP, FHIR DiagnosticReport and signed webhooks through the export outbox, against real
peers (tests/support/channel_peers.py): what each carries per version, ACK handling (AA sent; AE/AR retried, DEAD with
the RIS's reason, re-armed by `radialog export retry`), signatures and at-least-once delivery with one
idempotency key per event."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from radialog.registry import Export, Registry, Report, Study, utcnow
from radialog.settings import Destination, Settings
from reporting.channels import fhir
from reporting.channels.outbox import study_failed
from reporting.export import deliver, deliver_due
from reporting.versions import create_ai_draft, create_version
from tests.support.channel_peers import FhirEndpoint, MLLPListener, WebhookReceiver
from tests.support.seeding import FINDINGS_TEXT, PROVENANCE, add_study_without_history, model_output

SECRET = "s3cret-for-the-test-receiver"
HOSTILE = "Heart | big ^ caret & amp ~ tilde \\ backslash \\F\\ literal.\nSecond line é 漢字."


def _settings(settings: Settings, destinations: list[Destination], attempts: int = 3) -> Settings:
    return settings.model_copy(
        update={
            "destinations": destinations,
            "export_max_attempts": attempts,
            "export_backoff_initial": 0.0,
            "export_backoff_max": 0.0,
            "network_timeout": 3.0,
        }
    )


def _draft(registry: Registry, settings: Settings, text: str = FINDINGS_TEXT) -> int:
    study_id, _ = add_study_without_history(registry, settings)
    with registry.session() as session:
        create_ai_draft(session, settings, study_id, model_output(study_id, text), PROVENANCE)
    return study_id


def _version(registry: Registry, settings: Settings, study_id: int, kind: str, text: str, approve: bool) -> None:
    with registry.session() as session:
        create_version(
            session,
            settings,
            study_id,
            kind=kind,
            findings_text=text,
            impression_text=None,
            author="Smith^Anna",
            approve=approve,
        )


def _rows(registry: Registry, destination: str | None = None) -> list[Export]:
    with registry.session() as session:
        query = select(Export).order_by(Export.id)
        if destination:
            query = query.where(Export.destination == destination)
        rows = list(session.scalars(query))
        session.expunge_all()
        return rows


def _obx(message, code: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [message.unescape(str(seg(5))) for seg in message.segments("OBX") if str(seg(3)).startswith(code)]


def test_ris_gets_p_then_f_then_c_with_the_text_as_stored(sqlite_registry: Registry, settings: Settings) -> None:
    ris = MLLPListener("AA")
    try:
        settings = _settings(
            settings,
            [
                Destination(
                    name="ris", kind="hl7", port=ris.port, receiving_application="RIS", receiving_facility="HOSP"
                )
            ],
        )
        study_id = _draft(sqlite_registry, settings, HOSTILE)
        assert set(deliver_due(sqlite_registry, settings).values()) == {"SENT"}
        [draft] = ris.messages
        with sqlite_registry.session() as session:
            study = session.get(Study, study_id)
            accession, patient_id, uid = study.accession_number, study.patient_id, study.study_instance_uid
        assert str(draft.segment("MSH")(9)) == "ORU^R01^ORU_R01" and str(draft.segment("MSH")(12)) == "2.5.1"
        assert draft.unescape(str(draft.segment("PID")(3))) == patient_id
        assert draft.unescape(str(draft.segment("OBR")(3))) == accession
        assert str(draft.segment("OBR")(4)).startswith("18748-4") and str(draft.segment("OBR")(25)) == "P"
        assert "\n".join(_obx(draft, "59776-5")) == HOSTILE  # the text exactly as stored, separators escaped
        assert _obx(draft, "121106")[0].startswith("AI DRAFT - NOT VERIFIED")
        assert _obx(draft, "113014") == [uid]
        assert {str(seg(11)) for seg in draft.segments("OBX")} == {"P"}

        _version(sqlite_registry, settings, study_id, "edit", "Edited, unverified.", approve=False)
        _version(sqlite_registry, settings, study_id, "approval", "Edited, unverified.", approve=True)
        _version(sqlite_registry, settings, study_id, "edit", "Changed after signing.", approve=False)
        _version(sqlite_registry, settings, study_id, "approval", "Changed after signing.", approve=True)
        deliver_due(sqlite_registry, settings)
        statuses = [str(m.segment("OBR")(25)) for m in ris.messages]
        assert statuses == ["P", "P", "F", "C"]  # the unverified edit after the approval is not sent
        final = ris.messages[2]
        assert "Smith" in str(final.segment("OBR")(32)) and _obx(final, "121106")[0].startswith("Verified by Smith")
        assert _obx(ris.messages[3], "59776-5") == ["Changed after signing."]
        assert len({str(m.segment("MSH")(10)) for m in ris.messages}) == 4
    finally:
        ris.stop()


@pytest.mark.parametrize("code", ["AE", "AR"])
def test_refusing_ris_is_retried_then_dead_with_its_reason_and_retry_rearms(
    sqlite_registry: Registry,
    settings: Settings,
    code: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    ris = MLLPListener(code, text="unknown accession")
    hooks = WebhookReceiver(SECRET)
    try:
        settings = _settings(
            settings,
            [
                Destination(name="ris", kind="hl7", port=ris.port),
                Destination(name="hooks", kind="webhook", url=hooks.url, secret=SECRET, events=["export.dead"]),
            ],
        )
        _draft(sqlite_registry, settings)
        [row] = _rows(sqlite_registry, "ris")
        assert deliver(sqlite_registry, settings, row.id) == "PENDING"
        assert deliver(sqlite_registry, settings, row.id) == "PENDING"
        assert deliver(sqlite_registry, settings, row.id) == "DEAD"
        [row] = _rows(sqlite_registry, "ris")
        assert row.state == "DEAD" and row.attempts == 3 and len(ris.messages) == 3
        assert code in row.last_error and "unknown accession" in row.last_error
        logged = " ".join(str(vars(record)) for record in caplog.records)
        assert "unknown accession" not in logged  # what a peer says may quote patient data: not logged
        assert f"the RIS answered {code}" in logged

        # export.dead told to the webhook, once, with the reason
        assert set(deliver_due(sqlite_registry, settings).values()) == {"SENT"}
        [event] = hooks.events().values()
        assert event["type"] == "export.dead" and event["data"]["export"]["destination"] == "ris"
        assert "unknown accession" in event["data"]["export"]["reason"]

        # the operator sees it, fixes the RIS, and re-arms it
        monkeypatch.setenv("RADIALOG_DATA_DIR", str(settings.data_dir))
        monkeypatch.setenv(
            "RADIALOG_DESTINATIONS", json.dumps([d.model_dump(mode="json") for d in settings.destinations])
        )
        from composition.cli import main
        from radialog.settings import get_settings

        get_settings.cache_clear()
        try:
            listing = CliRunner().invoke(main, ["export", "list", "--state", "DEAD"])
            assert "ris" in listing.output and "unknown accession" in listing.output
            events = CliRunner().invoke(main, ["export", "list", "--state", "SENT"])
            assert "export.dead" in events.output and "hooks" in events.output  # event rows are listed too
            ris.answer = "AA"
            assert CliRunner().invoke(main, ["export", "retry", str(row.id)]).exit_code == 0
        finally:
            get_settings.cache_clear()
        assert deliver(sqlite_registry, settings, row.id) == "SENT"
        assert _rows(sqlite_registry, "ris")[0].state == "SENT"
    finally:
        ris.stop()
        hooks.stop()


def test_silent_ris_is_a_timeout_with_its_reason(sqlite_registry: Registry, settings: Settings) -> None:
    ris = MLLPListener("silent")
    try:
        settings = _settings(settings, [Destination(name="ris", kind="hl7", port=ris.port)]).model_copy(
            update={"network_timeout": 0.5}
        )
        _draft(sqlite_registry, settings)
        [row] = _rows(sqlite_registry)
        assert deliver(sqlite_registry, settings, row.id) == "PENDING"
        assert "no ACK from the RIS" in _rows(sqlite_registry)[0].last_error
    finally:
        ris.stop()


def test_no_ris_listening_is_retried(sqlite_registry: Registry, settings: Settings) -> None:
    from tests.support.ports import free_port

    settings = _settings(settings, [Destination(name="ris", kind="hl7", port=free_port())])
    _draft(sqlite_registry, settings)
    [row] = _rows(sqlite_registry)
    assert deliver(sqlite_registry, settings, row.id) == "PENDING"
    assert "MLLP connection" in _rows(sqlite_registry)[0].last_error


def test_fhir_server_gets_preliminary_final_amended_as_one_report(
    sqlite_registry: Registry, settings: Settings
) -> None:
    server = FhirEndpoint()
    try:
        settings = _settings(settings, [Destination(name="fhir", kind="fhir", url=server.url)])
        study_id = _draft(sqlite_registry, settings)
        assert set(deliver_due(sqlite_registry, settings).values()) == {"SENT"}, _rows(sqlite_registry)[0].last_error
        _version(sqlite_registry, settings, study_id, "approval", FINDINGS_TEXT, approve=True)
        _version(sqlite_registry, settings, study_id, "approval", "Amended text.", approve=True)
        assert set(deliver_due(sqlite_registry, settings).values()) == {"SENT"}
        assert [r["status"] for r in server.history] == ["preliminary", "final", "amended"]
        assert len(server.resources) == 1  # one DiagnosticReport per study, updated
        draft, final, amended = server.history
        assert draft["code"]["coding"][0]["code"] == "18748-4"
        observations = [c for c in draft["contained"] if c["resourceType"] == "Observation"]
        assert {o["code"]["text"] for o in observations} >= {"Cardiomegaly", "Pleural Effusion"}
        snomed = {o["code"]["coding"][0]["code"] for o in observations}
        assert "287272002" in snomed  # the SR's code for cardiomegaly
        assert not [c for c in final["contained"] if c["resourceType"] == "Observation"]  # as the signed SR
        assert final["resultsInterpreter"] == [{"display": "Smith^Anna"}]
        assert base64.b64decode(amended["presentedForm"][0]["data"]).decode().endswith("Amended text.")
        with sqlite_registry.session() as session:
            uid = session.get(Study, study_id).study_instance_uid
        assert draft["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{uid}"
    finally:
        server.stop()


def test_fhir_refusal_is_retried_with_the_outcome(sqlite_registry: Registry, settings: Settings) -> None:
    server = FhirEndpoint()
    server.server.status = 422
    try:
        settings = _settings(settings, [Destination(name="fhir", kind="fhir", url=server.url)])
        _draft(sqlite_registry, settings)
        [row] = _rows(sqlite_registry)
        assert deliver(sqlite_registry, settings, row.id) == "PENDING"
        assert "answered 422" in _rows(sqlite_registry)[0].last_error
    finally:
        server.stop()


def test_webhooks_signed_retried_and_idempotent(sqlite_registry: Registry, settings: Settings) -> None:
    hooks = WebhookReceiver(SECRET)
    try:
        settings = _settings(
            settings, [Destination(name="hooks", kind="webhook", url=hooks.url, secret=SECRET)], attempts=5
        )
        hooks.set_status(503)  # the receiver is down at first: retried
        study_id = _draft(sqlite_registry, settings)
        [row] = _rows(sqlite_registry)
        assert deliver(sqlite_registry, settings, row.id) == "PENDING"
        hooks.set_status(200)
        assert deliver(sqlite_registry, settings, row.id) == "SENT"
        first, second = hooks.deliveries
        assert first["valid"] and second["valid"]
        assert first["headers"]["idempotency-key"] == second["headers"]["idempotency-key"]  # same event twice
        assert first["body"] == second["body"]
        [event] = hooks.events().values()
        assert event["type"] == "study.reported" and event["data"]["report"]["status"] == "preliminary"
        body = second["body"].decode()
        with sqlite_registry.session() as session:
            study = session.get(Study, study_id)
            for private in (study.patient_name, study.patient_id, study.accession_number):
                assert private not in body

        _version(sqlite_registry, settings, study_id, "edit", "An unverified edit.", approve=False)  # no event
        _version(sqlite_registry, settings, study_id, "approval", "An unverified edit.", approve=True)
        with sqlite_registry.session() as session:
            study_failed(session, settings, study_id, "model error: test", utcnow())
        deliver_due(sqlite_registry, settings)
        types = sorted(e["type"] for e in hooks.events().values())
        assert types == ["report.approved", "study.failed", "study.reported"]
    finally:
        hooks.stop()


def test_wrong_secret_is_refused_by_the_receiver_and_retried(sqlite_registry: Registry, settings: Settings) -> None:
    hooks = WebhookReceiver(SECRET)
    try:
        settings = _settings(
            settings, [Destination(name="hooks", kind="webhook", url=hooks.url, secret="another-secret-of-16+chars")]
        )
        _draft(sqlite_registry, settings)
        [row] = _rows(sqlite_registry)
        assert deliver(sqlite_registry, settings, row.id) == "PENDING"
        assert hooks.deliveries[0]["valid"] is False and "answered 401" in _rows(sqlite_registry)[0].last_error
    finally:
        hooks.stop()


def test_every_served_resource_validates(sqlite_registry: Registry, settings: Settings) -> None:
    from reporting.channels.outbox import study_view, version_view

    study_id = _draft(sqlite_registry, settings)
    _version(sqlite_registry, settings, study_id, "ai_correction", "Corrected by the model.", approve=False)
    with sqlite_registry.session() as session:
        study = session.get(Study, study_id)
        for report in session.scalars(select(Report).where(Report.study_id == study_id)):
            resource = fhir.diagnostic_report(study_view(study), version_view(session, settings, report))
            fhir.validate(resource)
            for contained in resource["contained"]:
                fhir.validate(contained)


def test_destination_settings_are_checked(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs a secret"):
        Destination(name="h", kind="webhook", url="http://x", secret="short")
    with pytest.raises(ValidationError, match="unknown events"):
        Destination(name="h", kind="webhook", url="http://x", secret=SECRET, events=["study.exploded"])
    with pytest.raises(ValidationError, match="needs a url"):
        Destination(name="f", kind="fhir")
    with pytest.raises(ValidationError, match="unique"):
        Settings(data_dir=tmp_path, destinations=[Destination(name="a"), Destination(name="a", port=1)])


def test_a_study_that_crashed_its_worker_twice_raises_study_failed(
    sqlite_registry: Registry, settings: Settings
) -> None:
    """The other way a study fails for good (workers.crashes): its webhook row comes with the failure."""
    from datetime import timedelta

    from radialog.registry import Job, StudyState
    from workers.crashes import ALONE, FAILED, MAX_CRASHES, recover_lost

    hooks = WebhookReceiver(SECRET)
    try:
        settings = _settings(settings, [Destination(name="hooks", kind="webhook", url=hooks.url, secret=SECRET)])
        study_id, _ = add_study_without_history(sqlite_registry, settings, state=StudyState.RUNNING)
        long_ago = utcnow() - timedelta(hours=1)
        with sqlite_registry.session() as session:
            job = Job(
                study_id=study_id,
                model_name="radialog-v2",
                model_version="configured",
                state="RUNNING",
                attempts=2,
                run_mode=ALONE,
                crashes=MAX_CRASHES - 1,
                started_at=long_ago,
                heartbeat_at=long_ago,
                queued_at=long_ago,
                timings={},
            )
            session.add(job)
            session.flush()
            assert recover_lost(session, job.id, 60.0, settings) == FAILED
        assert set(deliver_due(sqlite_registry, settings).values()) == {"SENT"}
        [event] = hooks.events().values()
        assert event["type"] == "study.failed" and "died 2 times" in event["data"]["reason"]
    finally:
        hooks.stop()
