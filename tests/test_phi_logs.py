"""No patient data in any log line (issue 14, item 6): a marker patient pushed through every failing path.

The marker's name, ID, birth date and accession number are strings no log line may contain. In this
process: pydicom reading a header whose UID length swallows the patient module, highdicom warning about
the name, a model error, a registry error and an exception in a thread, each with the marker in the
exception text, through ``radialog.logging`` to its JSON stream and to the raw stderr. With real
processes (slow): ``radialog node`` and ``radialog worker`` at DEBUG level, their whole stdout/stderr
captured, through a corrupted header, a registry error, an undecodable image, a report and an export
that the PACS refuses.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from radialog import logging as rlog
from radialog.settings import Settings
from radialog.synthetic import make_cxr

NAME, PATIENT_ID, BIRTH_DATE, ACCESSION = "PHIMARKERNAME", "PHIMRKID7731", "19010203", "PHIACC5529"
MARKERS = (NAME, PATIENT_ID, BIRTH_DATE, ACCESSION)


def marker_patient(**kwargs: Any) -> Dataset:
    """A chest X-ray of the marker patient (a one-component name: highdicom warns about it, quoting it)."""
    ds = make_cxr(**{"rows": 128, "cols": 128, **kwargs})
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = NAME, PATIENT_ID, BIRTH_DATE, ACCESSION
    return ds


def corrupted_dataset(ds: Dataset) -> bytes:
    """The encoded data set with the SOP Instance UID's length set to 240: pydicom reads the accession
    number, patient name, ID and birth date that follow as part of the UID, and warns quoting it."""
    data = bytearray(encode(ds, False, True))
    tag = struct.pack("<HH", 0x0008, 0x0018) + b"UI"
    at = data.index(tag)
    data[at + 6 : at + 8] = struct.pack("<H", 240)
    return bytes(data)


def leaked(text: str) -> list[str]:
    return [marker for marker in MARKERS if marker in text]


@pytest.fixture
def logged(capfd: pytest.CaptureFixture[str]) -> Iterator[io.StringIO]:
    """radialog.logging configured at DEBUG on a buffer, warnings shown (not recorded by pytest);
    afterwards the buffer and everything written to the process's stderr and stdout must be marker-free."""
    stream = io.StringIO()
    saved = (logging.getLogRecordFactory(), threading.excepthook, logging.getLogger().level)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        rlog.configure("DEBUG", stream=stream)
        try:
            yield stream
        finally:
            logging.setLogRecordFactory(saved[0])
            threading.excepthook = saved[1]
            root = logging.getLogger()
            root.setLevel(saved[2])
            for handler in [h for h in root.handlers if getattr(h, "_radialog", False)]:
                root.removeHandler(handler)
    out, err = capfd.readouterr()
    assert stream.getvalue(), "nothing was logged: the paths were not exercised"
    assert leaked(stream.getvalue()) == [], stream.getvalue()
    assert leaked(err + out) == [], err + out


def test_corrupted_header_read_by_the_node(logged: io.StringIO, tmp_path: Path) -> None:
    from pydicom.filewriter import write_file_meta_info

    from dicom_node.header import read_header

    ds = marker_patient()
    path = tmp_path / "corrupt.dcm"
    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta, enforce_standard=True)
        fh.write(corrupted_dataset(ds))
    header = read_header(path)
    assert NAME in (header.sop_instance_uid or ""), "the corruption did swallow the patient module"
    logging.getLogger("pydicom").error("raw value %r", header.sop_instance_uid)  # as pydicom's error lines do


def test_highdicom_and_pydicom_warnings(logged: io.StringIO) -> None:
    from highdicom.valuerep import check_person_name
    from pydicom.valuerep import PersonName

    check_person_name(NAME)
    check_person_name(PersonName(NAME))
    warnings.warn(f"Invalid value for VR PN: '{NAME}^{PATIENT_ID}'", UserWarning, stacklevel=1)
    assert "warning (text withheld)" in logged.getvalue()


def test_model_error_registry_error_and_celery_failure_lines(logged: io.StringIO) -> None:
    """Exception texts quoting the data: a model error as the worker logs it, a PostgreSQL error
    ("Failing row contains (...)") as SQLAlchemy wraps it, and Celery's task failure line, which copies
    repr(exc) and the formatted traceback into its arguments and extras."""
    import traceback

    from sqlalchemy.exc import IntegrityError

    from workers.pipeline import log as pipeline_log

    model_error = RuntimeError(f"prompt for {NAME} ({PATIENT_ID}) too long")
    pipeline_log.warning("model failed on one study", extra={"job": 1}, exc_info=model_error)
    pipeline_log.error("model failed: %s", model_error)  # an exception as an argument, without exc_info
    try:
        try:
            raise ValueError(f"Failing row contains (7, {NAME}, {PATIENT_ID}, {ACCESSION}, {BIRTH_DATE})")
        except ValueError as orig:
            raise IntegrityError("INSERT INTO studies ...", {"patient_name": NAME}, orig) from orig
    except IntegrityError:
        logging.getLogger("sqlalchemy.pool").error("Exception during reset or similar", exc_info=True)  # noqa: G201
        logging.getLogger("dicom_node.store").exception("store failed")
    try:
        raise ValueError(f"cannot build SR for {NAME}")
    except ValueError as exc:
        context = {
            "id": "abc",
            "name": "radialog.report",
            "exc": repr(exc),
            "traceback": traceback.format_exc(),
            "description": "raised unexpected",
        }
        celery = logging.getLogger("celery.app.trace")  # as celery.app.trace._log_error does
        celery.error("Task %(name)s[%(id)s] %(description)s: %(exc)s", context, exc_info=True, extra={"data": context})
        logging.getLogger("pynetdicom.events").exception(exc)  # noqa: TRY401 - as pynetdicom does
    assert "RuntimeError (message withheld)" in logged.getvalue()


def test_exception_ending_a_thread(logged: io.StringIO) -> None:
    def crash() -> None:
        raise KeyError(f"{NAME}/{ACCESSION}")

    thread = threading.Thread(target=crash, name="crasher")
    thread.start()
    thread.join()
    line = json.loads(logged.getvalue().splitlines()[-1])
    assert line["msg"] == "thread ended by an exception" and line["thread_name"] == "crasher"


# -- real processes ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_marker_in_the_logs_of_node_and_worker(
    tmp_path: Path, settings: Settings, tiny_model: tuple[Path, Path]
) -> None:
    """``radialog node`` and ``radialog worker`` at DEBUG, PostgreSQL registry, real Redis; the marker
    patient goes through: a corrupted header (the node refuses it), a registry error (a CHECK constraint
    whose message is "Failing row contains (<the row>)": refused 0xC000), an image that cannot be decoded (the worker
    fails the study), a report whose SR names the patient, and its export refused by the PACS."""
    from contextlib import contextmanager

    from sqlalchemy import select

    from bench.dicom_wire import Peer
    from radialog.registry import Export, Study
    from tests.conftest import _pg_schema_registry
    from tests.support.brokers import redis_url
    from tests.support.dicom_peers import StorePeer, store_all
    from tests.support.ports import free_port
    from tests.test_pipeline import Harness

    refusing = StorePeer(ae_title="TESTPACS", status=0xA700)  # takes the SR's association, refuses the SR
    settings = settings.model_copy(update={"destinations": [refusing.destination("pacs")]})
    with contextmanager(_pg_schema_registry)() as registry:
        with registry.engine.begin() as conn:
            conn.exec_driver_sql(
                "ALTER TABLE studies ADD CONSTRAINT refuse_marked "
                "CHECK (study_description IS DISTINCT FROM 'REFUSE ME')"
            )
        h = Harness(tmp_path, registry, settings, tiny_model, redis_url=redis_url(__name__))
        try:
            port = free_port()
            env = h.env(
                dicom_port=port,
                dicom_host="127.0.0.1",
                stable_after=0.5,
                batch_wait_ms=0,
                export_backoff_initial=1.0,
                log_level="DEBUG",
            )
            node = h.start_process("node", ["node"], env)
            h.start_worker("w-phi", env_overrides={"log_level": "DEBUG", "export_backoff_initial": 1.0})
            h.wait_for(lambda: "node listening" in node.output(), "node listening")

            corrupt = marker_patient(seed=1)
            peer = Peer.associate(port)
            assert peer.store(1, corrupt.SOPInstanceUID, corrupted_dataset(corrupt)) == 0xC000
            peer.release()
            refused = marker_patient(seed=2)
            refused.StudyDescription = "REFUSE ME"
            undecodable = marker_patient(seed=3)
            undecodable.PixelData = undecodable.PixelData[:1000]
            reported = marker_patient(seed=4)
            assert store_all(port, [refused, undecodable, reported]) == [0xC000, 0, 0]

            def settled() -> bool:
                with registry.session() as session:
                    states = dict(session.execute(select(Study.study_instance_uid, Study.state)).all())
                    errors = [e.last_error for e in session.scalars(select(Export))]
                return (
                    states.get(undecodable.StudyInstanceUID) == "FAILED"
                    and states.get(reported.StudyInstanceUID) == "REPORTED"
                    and any(errors)
                )

            h.wait_for(settled, "the undecodable study FAILED and the report's export refused by the PACS")
        finally:
            h.close()
            refusing.stop()
        logs = {worker.name: worker.output() for worker in h.workers}
        for name, text in logs.items():
            assert leaked(text) == [], (
                f"{name}: " + "\n".join(line for line in text.splitlines() if leaked(line))[:4000]
            )
        assert "warning (text withheld)" in logs["node"]  # the corrupted header's pydicom warning
        assert "store refused" in logs["node"] and "model" in logs["w-phi"]
