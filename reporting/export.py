"""The export outbox: deliver each report version to every destination, retrying with backoff, at least once.

A destination is one output channel (``settings.Destination.kind``): a PACS by C-STORE (``dimse``) or
STOW-RS (``stow``) gets the SR; a RIS (``hl7``) an ORU^R01 over MLLP, a FHIR server (``fhir``) the
DiagnosticReport, a webhook receiver (``webhook``) a signed event (``reporting.channels``). Which rows a
version makes is ``reporting.channels.outbox``'s rule; retries, DEAD and ``radialog export`` are the same
for every kind.

Rows are Export records (one per SR x destination), created PENDING together with the version. A
delivery claims its row with a compare-and-set UPDATE (attempts + 1, next attempt pushed past the
longest possible send), sends without holding a transaction, then records the outcome. So concurrent
or repeated ``deliver`` calls for one row send it at most once per claim, and a sender killed mid-send
only delays the next try. The PACS may see the same SOP Instance UID twice (at-least-once); that is a
no-op there, and the file on disk is the only content that UID ever has.

Failures (PACS down, association rejected, SOP class refused, failure status) are retried with jittered
exponential backoff from ``export_backoff_initial`` up to ``export_backoff_max``; after
``export_max_attempts`` the row is DEAD with the last reason. ``radialog export retry ID`` re-arms it.
A study becomes EXPORTED when every export of its latest version is SENT.
"""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from radialog.logging import get_logger
from radialog.registry import Export, ExportState, Registry, Study, StudyState, transition, utcnow
from radialog.registry.queries import latest_report
from radialog.settings import Destination, Settings
from reporting.channels import outbox
from reporting.channels.base import Delivery, DeliveryError

log = get_logger(__name__)

PENDING, SENT, DEAD = ExportState.PENDING.value, ExportState.SENT.value, ExportState.DEAD.value

__all__ = ["DeliveryError", "backoff_seconds", "deliver", "deliver_due", "due_exports", "rearm"]


@dataclass(frozen=True)
class _Claim:
    export_id: int
    attempt: int
    destination: str
    sr_file: Path | None
    study_id: int | None
    report_id: int | None
    delivery: Delivery | str  # what a non-DICOM channel sends, or why it cannot be read


def due_exports(session: Session, now: datetime) -> list[int]:
    """Ids of PENDING exports whose next attempt is due at ``now``, oldest first."""
    return list(
        session.scalars(
            select(Export.id)
            .where(Export.state == PENDING, or_(Export.next_attempt_at.is_(None), Export.next_attempt_at <= now))
            .order_by(Export.next_attempt_at, Export.id)
        )
    )


def backoff_seconds(settings: Settings, attempt: int, rng: random.Random | None = None) -> float:
    """Delay after failed attempt number ``attempt`` (1-based): doubling, capped, with 50-100 % jitter."""
    base = min(settings.export_backoff_max, settings.export_backoff_initial * 2 ** max(attempt - 1, 0))
    return base * (rng or random).uniform(0.5, 1.0)


def claim_lease_seconds(settings: Settings) -> float:
    """How long a claim keeps others away: longer than the slowest possible send."""
    return settings.acse_timeout + settings.dimse_timeout + settings.network_timeout + 30.0


def _destination(settings: Settings, name: str) -> Destination:
    for destination in settings.destinations:
        if destination.name == name:
            return destination
    raise DeliveryError(f"destination {name!r} is not configured")


def _claim(registry: Registry, settings: Settings, export_id: int) -> _Claim | str:
    now = utcnow()
    with registry.session() as session:
        # A sender that died mid-send (every time) never recorded its failure: the budget ends here too.
        exhausted = session.execute(  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
            update(Export)
            .where(
                Export.id == export_id,
                Export.state == PENDING,
                Export.attempts >= settings.export_max_attempts,
                or_(Export.next_attempt_at.is_(None), Export.next_attempt_at <= now),
            )
            .values(
                state=DEAD,
                next_attempt_at=None,
                last_error=f"gave up after {settings.export_max_attempts} attempts that never reported back",
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if exhausted == 1:
            row = session.get(Export, export_id)
            if row is not None:
                outbox.export_dead(session, settings, row, str(row.last_error), now)
            return DEAD
        claimed = session.execute(  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
            update(Export)
            .where(
                Export.id == export_id,
                Export.state == PENDING,
                or_(Export.next_attempt_at.is_(None), Export.next_attempt_at <= now),
            )
            .values(
                attempts=Export.attempts + 1, next_attempt_at=now + timedelta(seconds=claim_lease_seconds(settings))
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        export = session.get(Export, export_id)
        if export is None:
            return "missing"
        if claimed != 1:
            return f"skipped: {export.state.lower()}" if export.state != PENDING else "skipped: not due or in flight"
        report = export.report
        delivery: Delivery | str
        try:
            delivery = outbox.delivery_of(session, settings, export)
        except (OSError, ValueError) as exc:  # the SR file of the version is unreadable: a reason, not a crash
            delivery = f"the report version cannot be read ({type(exc).__name__})"
        return _Claim(
            export_id=export.id,
            attempt=export.attempts,
            destination=export.destination,
            sr_file=settings.sr_dir / (report.sr_path or "") if report is not None else None,
            study_id=report.study_id if report is not None else export.study_id,
            report_id=report.id if report is not None else None,
            delivery=delivery,
        )


def _tls_context(destination: Destination) -> ssl.SSLContext:
    assert destination.tls is not None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls.ca_file) if destination.tls.ca_file else None
    )
    context.load_cert_chain(str(destination.tls.certfile), str(destination.tls.keyfile))
    return context


def _status_text(status: Dataset) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

    code = int(status.Status)
    category = code_to_category(code)
    description = STORAGE_SERVICE_CLASS_STATUS.get(code, (category, "unknown status"))[1]
    comment = status.get("ErrorComment")
    return f"0x{code:04X} {category}: {description}" + (f" ({comment})" if comment else "")


def send_dimse(settings: Settings, destination: Destination, dataset: Dataset) -> str:
    """C-STORE one SR to a DICOM destination; returns the status text, raises DeliveryError otherwise."""
    from pynetdicom import AE
    from pynetdicom.status import code_to_category

    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    sop_class = dataset.SOPClassUID
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (_tls_context(destination), destination.host) if destination.tls else None
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    refused = f"{where} refused the SOP class {sop_class.name} ({sop_class}): no accepted presentation context"
    if not assoc.is_established:
        if assoc.is_rejected:
            raise DeliveryError(f"association rejected by {where}")
        if any(cx.abstract_syntax == sop_class for cx in assoc.rejected_contexts):
            raise DeliveryError(refused)  # pynetdicom aborts an association with nothing accepted
        raise DeliveryError(f"no association with {where} (unreachable, aborted or timed out)")
    try:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
        if not accepted:
            raise DeliveryError(refused)
        status = assoc.send_c_store(dataset)
        if not status or "Status" not in status:
            raise DeliveryError(f"no C-STORE response from {where} (timeout or abort)")
        text = _status_text(status)
        if code_to_category(int(status.Status)) not in ("Success", "Warning"):
            raise DeliveryError(f"{where} answered C-STORE with failure status {text}")
        return text
    finally:
        if assoc.is_established:
            assoc.release()


def send_stow(settings: Settings, destination: Destination, dataset: Dataset) -> str:
    """STOW-RS one SR to a DICOMweb endpoint (``destination.url``)."""
    from dicomweb_client.api import DICOMwebClient

    if not destination.url:
        raise DeliveryError(f"STOW destination {destination.name!r} has no url")
    import requests

    session = requests.Session()
    if destination.tls is not None:  # client certificate and the hospital CA, as for DICOM TLS
        session.cert = (str(destination.tls.certfile), str(destination.tls.keyfile))
        if destination.tls.ca_file:
            session.verify = str(destination.tls.ca_file)
    client = DICOMwebClient(
        url=destination.url, session=session, timeout=(settings.acse_timeout, settings.network_timeout)
    )
    client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff and budget
    try:
        response = client.store_instances([dataset])
    except Exception as exc:  # requests' HTTPError / ConnectionError: the reason is what matters
        raise DeliveryError(f"STOW-RS to {destination.url} failed: {type(exc).__name__}: {exc}") from exc
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reason = failed[0].get("FailureReason")
        raise DeliveryError(f"STOW-RS to {destination.url} refused the instance (FailureReason {reason})")
    return "stored (STOW-RS)"


def _send(settings: Settings, claim: _Claim) -> str:
    destination = _destination(settings, claim.destination)
    if destination.carries_sr:
        if claim.sr_file is None or not claim.sr_file.is_file():
            raise DeliveryError(f"SR file of report {claim.report_id} is missing")
        dataset = dcmread(claim.sr_file)
        if destination.kind == "stow":
            return send_stow(settings, destination, dataset)
        return send_dimse(settings, destination, dataset)
    if isinstance(claim.delivery, str):
        raise DeliveryError(claim.delivery)
    return send_channel(settings, destination, claim.delivery)


def send_channel(settings: Settings, destination: Destination, delivery: Delivery) -> str:
    """Send one row to an HL7, FHIR or webhook destination (``reporting.channels``)."""
    from reporting.channels import fhir, hl7v2, webhook

    timeout_s = settings.network_timeout
    if destination.kind == "webhook":
        assert destination.url and destination.secret
        return webhook.send(delivery, destination.url, destination.secret, timeout_s)
    if delivery.version is None:
        raise DeliveryError(f"{destination.kind} destination {destination.name!r} got a row without a version")
    if destination.kind == "fhir":
        assert destination.url
        return fhir.send(delivery, destination.url, destination.secret, timeout_s)
    message = hl7v2.build_oru(
        delivery,
        sending_application=settings.ae_title,
        sending_facility=settings.institution_name,
        receiving_application=destination.receiving_application,
        receiving_facility=destination.receiving_facility,
    )
    return hl7v2.send_oru(destination.host, destination.port, message, f"RL{delivery.export_id}", timeout_s)


def _study_exported(session: Session, study_id: int) -> bool:
    """True when every export of the study's latest version is SENT (and there is at least one)."""
    latest = latest_report(session, study_id)
    if latest is None:
        return False
    states = list(session.scalars(select(Export.state).where(Export.report_id == latest.id)))
    return bool(states) and all(state == SENT for state in states)


def _record_success(registry: Registry, claim: _Claim, detail: str) -> str:
    now = utcnow()
    with registry.session() as session:
        # The UPDATE comes first: on SQLite it takes the write lock before anything is read; on PostgreSQL
        # the study row lock below then serialises finishers of one study, so the last one sees all SENT.
        session.execute(
            update(Export)
            .where(Export.id == claim.export_id, Export.state == PENDING)
            .values(state=SENT, sent_at=now, last_error=None, next_attempt_at=None)
            .execution_options(synchronize_session=False)
        )
        if claim.report_id is not None and claim.study_id is not None:  # event rows move no study
            session.execute(select(Study.id).where(Study.id == claim.study_id).with_for_update())
            if _study_exported(session, claim.study_id):
                transition(session, claim.study_id, StudyState.EXPORTED, "report accepted by every destination")
    log.info(
        "export sent",
        extra={
            "export": claim.export_id,
            "report": claim.report_id,
            "attempt": claim.attempt,
            "destination": claim.destination,
            "status": detail,
        },
    )
    return SENT


def _record_failure(
    registry: Registry, settings: Settings, claim: _Claim, reason: str, loggable: str | None = None
) -> str:
    now = utcnow()
    dead = claim.attempt >= settings.export_max_attempts
    values: dict[str, object] = {"last_error": reason[:2000]}
    if dead:
        values.update(state=DEAD, next_attempt_at=None)
    else:
        values["next_attempt_at"] = now + timedelta(seconds=backoff_seconds(settings, claim.attempt))
    with registry.session() as session:
        changed = session.execute(  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
            update(Export)
            .where(Export.id == claim.export_id, Export.state == PENDING)
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if dead and changed == 1:
            row = session.get(Export, claim.export_id)
            if row is not None:
                outbox.export_dead(session, settings, row, reason, now)
    state = DEAD if dead else PENDING
    log.warning(
        "export attempt failed",
        extra={
            "export": claim.export_id,
            "attempt": claim.attempt,
            "destination": claim.destination,
            "state": state,
            "reason": (loggable if loggable is not None else reason)[:500],
        },
    )
    return state


def deliver(registry: Registry, settings: Settings, export_id: int) -> str:
    """Try to send one outbox row now. Returns SENT, PENDING (will retry), DEAD, or 'skipped: ...'.

    Safe to call concurrently and repeatedly: only the caller that claims a due PENDING row sends it.
    """
    claim = _claim(registry, settings, export_id)
    if isinstance(claim, str):
        return claim
    try:
        detail = _send(settings, claim)
    except DeliveryError as exc:
        return _record_failure(registry, settings, claim, str(exc), exc.loggable)
    except Exception as exc:  # noqa: BLE001 - an unexpected error must not leave the row claimed for nothing
        return _record_failure(registry, settings, claim, f"{type(exc).__name__}: {exc}")
    return _record_success(registry, claim, detail)


def deliver_due(registry: Registry, settings: Settings, now: datetime | None = None) -> dict[int, str]:
    """Deliver everything due now, one by one (for ops without Celery); export id -> outcome."""
    with registry.session() as session:
        ids = due_exports(session, now or utcnow())
    return {export_id: deliver(registry, settings, export_id) for export_id in ids}


def rearm(registry: Registry, export_id: int) -> bool:
    """Make a DEAD (or waiting) export due now with a fresh attempt budget; False when it was SENT."""
    with registry.session() as session:
        result = session.execute(
            update(Export)
            .where(Export.id == export_id, Export.state != SENT)
            .values(state=PENDING, attempts=0, next_attempt_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1  # type: ignore[attr-defined]  # DML: a CursorResult, typed Result
