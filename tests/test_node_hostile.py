"""Hostile DICOM peers (issue 14): bare connects, partial PDUs, slow senders, lying PDU lengths, floods,
oversized instances, a disk filling while data arrive, requests pynetdicom would leave unanswered, and
header text the database cannot hold. Loopback only, bounded counts; the figures are in bench/hostile.py."""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import encode
from sqlalchemy import func, select

from bench.dicom_wire import A_ABORT, Peer, associate_rq, closed_by_peer, p_data, pdu, read_pdu, trickle
from radialog.registry import Instance, Registry, Study
from radialog.settings import Settings
from radialog.synthetic import make_cxr
from tests.support.dicom_peers import echo, store_all
from tests.support.node import running_node, wait_idle


def _dataset_bytes(ds) -> bytes:  # type: ignore[no-untyped-def]
    return encode(ds, False, True)


def _connections(port: int, count: int, payload: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        if payload:
            sock.sendall(payload)
        socks.append(sock)
    return socks


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def test_partial_pdus_and_bare_connects_hold_no_association_slot(settings: Settings, sqlite_registry: Registry) -> None:
    """50 connections with 3 bytes of an A-ASSOCIATE-RQ and 20 silent ones, max_associations 2: a
    modality still associates and stores (before: 'Local Limit Exceeded' until the peers gave up)."""
    two = settings.model_copy(update={"max_associations": 2})
    with running_node(two, sqlite_registry) as node:
        partial = _connections(node.port, 50, associate_rq()[:3])
        silent = _connections(node.port, 20, b"")
        try:
            assert echo(node.port)
            assert store_all(node.port, [make_cxr(rows=64, cols=64)]) == [0]
            assert not [a for a in node.ae.active_associations if a.is_established]
        finally:
            _close_all(partial + silent)


@pytest.mark.parametrize(
    "payload", [b"", associate_rq()[:3], associate_rq()[:-10]], ids=["silent", "3 bytes", "all but 10 bytes"]
)
def test_connection_without_association_request_is_closed(
    settings: Settings, sqlite_registry: Registry, payload: bytes
) -> None:
    """Within acse_timeout of the accept, whatever the peer sent (before: a partial PDU blocked its
    reader in recv forever)."""
    fast = settings.model_copy(update={"acse_timeout": 1.0})
    with running_node(fast, sqlite_registry) as node:
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(payload)
            assert closed_by_peer(sock, wait=30)
        assert node.server.pending_count == 0
        assert echo(node.port)


def test_slow_sender_is_closed_at_pdu_timeout(settings: Settings, sqlite_registry: Registry) -> None:
    """An associated peer that trickles a P-DATA-TF one byte at a time is cut off after pdu_timeout,
    and the node goes on serving."""
    slow = settings.model_copy(update={"pdu_timeout": 1.0})
    with running_node(slow, sqlite_registry) as node:
        peer = Peer.associate(node.port)
        data = p_data(1, (0x03, b"\x00" * 200))
        sent = trickle(peer.sock, data, interval=0.1)  # 20 s at this rate if never cut off
        assert sent < len(data)
        assert closed_by_peer(peer.sock, wait=30)
        peer.close()
        wait_idle(node)
        assert store_all(node.port, [make_cxr(rows=64, cols=64)]) == [0]


@pytest.mark.parametrize("associated", [False, True], ids=["before association", "P-DATA-TF"])
def test_declared_length_beyond_limit_is_aborted_unread(
    settings: Settings, sqlite_registry: Registry, associated: bool
) -> None:
    """A PDU declaring 300 MB gets an A-ABORT at once, nothing of it is read (before: pynetdicom read
    whatever came of the 300 MB into memory and waited for the rest)."""
    with running_node(settings, sqlite_registry) as node:
        peer = Peer.associate(node.port) if associated else Peer.connect(node.port)
        pdu_type = 0x04 if associated else 0x01
        peer.send(struct.pack(">BBL", pdu_type, 0, 300 * 1024 * 1024) + b"\x00" * 4096)
        assert read_pdu(peer.sock)[0] == A_ABORT
        assert closed_by_peer(peer.sock, wait=30)
        peer.close()
        assert store_all(node.port, [make_cxr(rows=64, cols=64)]) == [0]


def test_pending_connections_beyond_the_cap_evict_the_oldest(settings: Settings, sqlite_registry: Registry) -> None:
    capped = settings.model_copy(update={"max_pending_connections": 5})
    with running_node(capped, sqlite_registry) as node:
        socks = _connections(node.port, 12, b"")
        try:
            assert all(closed_by_peer(sock, wait=30) for sock in socks[:7])
            assert echo(node.port)  # evicts one more silent connection, associates
            assert node.server.evicted >= 8
        finally:
            _close_all(socks)


def test_malformed_association_flood(settings: Settings, sqlite_registry: Registry) -> None:
    """320 connections, each a different malformed opening: right afterwards nothing is pending, no
    association thread lingers and a store succeeds (before: each decodable-length but garbled request
    held an association thread, and a slot, for the whole ACSE timeout)."""
    good = associate_rq()
    openings = [
        b"GET / HTTP/1.1\r\n\r\n",
        pdu(0x04, b"\x00" * 64),  # P-DATA before association
        pdu(0x01, b"\x00" * 10),  # A-ASSOCIATE-RQ too short to parse
        good[:6] + bytes(len(good) - 6),  # right length, zeroed body
        good[:40] + b"\xff" * (len(good) - 40),  # items garbled
        pdu(0x07, b"\x00" * 4),  # A-ABORT first
        bytes(range(256)),
        struct.pack(">BBL", 0x01, 0, 1 << 31),  # 2 GB association request
    ]
    four = settings.model_copy(update={"max_associations": 4})
    with running_node(four, sqlite_registry) as node:
        for index in range(320):
            with socket.create_connection(("127.0.0.1", node.port)) as sock:
                sock.sendall(openings[index % len(openings)])
                assert closed_by_peer(sock, wait=60)
        assert node.server.pending_count == 0
        assert store_all(node.port, [make_cxr(rows=64, cols=64)]) == [0]
        assert len(node.ae.active_associations) <= 1  # the store's own, ending


def test_instance_larger_than_the_limit_is_out_of_resources(settings: Settings, sqlite_registry: Registry) -> None:
    """0xA700 with nothing stored; the data beyond the limit never reach pynetdicom's assembly."""
    small = settings.model_copy(update={"max_instance_bytes": 1024 * 1024})
    assembled: list[int] = []

    def record(event: Any) -> None:  # what pynetdicom holds in memory for each complete message
        if isinstance(event.message, C_STORE_RQ):
            assembled.append(event.message.data_set.getbuffer().nbytes)

    with running_node(small, sqlite_registry) as node:
        node.server.bind(evt.EVT_DIMSE_RECV, record)
        big, fits = make_cxr(rows=1536, cols=1536), make_cxr(rows=256, cols=256)  # 4.7 MB, 131 kB
        assert store_all(node.port, [big, fits]) == [0xA700, 0]
    assert len(assembled) == 2 and max(assembled) <= 1024 * 1024 + small.max_pdu_bytes
    with sqlite_registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
    assert not list((small.spool_dir / ".incoming").iterdir())


@pytest.fixture
def quiet_disk(tmp_path: Path) -> Iterator[Path]:
    """A data directory on /dev/shm: free-space tests need a file system the other processes on this
    machine do not fill and empty by tens of MB per second, as they do the main disk."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    directory = Path(tempfile.mkdtemp(dir=shm, prefix="radialog-test-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_oversized_request_followed_at_once_by_a_good_one(settings: Settings, sqlite_registry: Registry) -> None:
    """A peer that sends its next C-STORE before the answer to an oversized one: the cut data set is
    refused (0xA700), the whole one stored; a refusal belongs to its Message ID, not to whatever the
    association receives next."""
    small = settings.model_copy(update={"max_instance_bytes": 1024 * 1024})
    big, good = make_cxr(rows=1536, cols=1536), make_cxr(rows=256, cols=256)
    with running_node(small, sqlite_registry) as node:
        peer = Peer.associate(node.port)
        try:
            peer.send_store(1, big.SOPInstanceUID, _dataset_bytes(big))
            peer.send_store(2, good.SOPInstanceUID, _dataset_bytes(good))
            assert [peer.response_status(), peer.response_status()] == [0xA700, 0]
        finally:
            peer.release()
    with sqlite_registry.session() as session:
        assert list(session.scalars(select(Instance.sop_instance_uid))) == [good.SOPInstanceUID]


def test_disk_floor_holds_while_data_arrive(settings: Settings, quiet_disk: Path) -> None:
    """The floor is checked for every fragment: a 40 MB instance with 24 MB above the floor is refused
    before its spool file passes the headroom (before: written whole, then refused); a 16 MB one is
    stored (before: its streamed bytes were counted twice and it was refused)."""
    spool_dir = quiet_disk / "var" / "spool"
    spool_dir.mkdir(parents=True)
    headroom = 24 * 1024 * 1024
    near_full = settings.model_copy(
        update={"data_dir": quiet_disk / "var", "min_free_bytes": shutil.disk_usage(spool_dir).free - headroom}
    )
    registry = Registry.from_settings(near_full)
    largest = [0]
    stop = threading.Event()

    def watch() -> None:
        incoming = spool_dir / ".incoming"
        while not stop.is_set():
            for part in incoming.glob("*.part") if incoming.is_dir() else []:
                try:
                    largest[0] = max(largest[0], part.stat().st_size)
                except OSError:
                    pass
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    fits = make_cxr(rows=2900, cols=2900)  # 16.8 MB
    too_big = make_cxr(rows=4500, cols=4500)  # 40.5 MB
    try:
        with running_node(near_full, registry) as node:
            assert store_all(node.port, [fits]) == [0]
            watcher.start()
            assert store_all(node.port, [too_big]) == [0xA700]
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        registry.dispose()
    assert 0 < largest[0] <= headroom, "the spool file grew past the free-space floor"
    assert not list((spool_dir / ".incoming").iterdir())


@pytest.mark.parametrize(
    ("sop_instance", "dataset"),
    [
        (None, b"present"),
        ("", b"present"),
        ("1.2.3.4", None),
        ("1.2.3.4", b""),
    ],
    ids=["no SOP Instance UID", "empty SOP Instance UID", "no data set", "empty data set"],
)
def test_unusable_store_requests_are_answered(
    settings: Settings, sqlite_registry: Registry, sop_instance: str | None, dataset: bytes | None
) -> None:
    """0xC000 at once (before: pynetdicom dropped the request and the sender waited for its timeout)."""
    data = _dataset_bytes(make_cxr(rows=32, cols=32)) if dataset == b"present" else dataset
    with running_node(settings, sqlite_registry) as node:
        peer = Peer.associate(node.port, timeout=20)
        try:
            assert peer.store(1, sop_instance, data) == 0xC000
            good = make_cxr(rows=32, cols=32)
            assert peer.store(2, good.SOPInstanceUID, _dataset_bytes(good)) == 0  # exactly one answer each
        finally:
            peer.release()
    with sqlite_registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1


def test_nul_and_control_characters_in_header_text(settings: Settings, registry: Registry) -> None:
    """On PostgreSQL too: stored with the text cleaned (before: 0xC211 on every retry, and a spool
    file without registry row)."""
    ds = make_cxr(rows=64, cols=64)
    ds.PatientName = "DOE\x00^JANE\x00\x00"
    ds.PatientID = "ID\x00123\x1b"
    ds.StudyDescription = "CHEST\x00 PA\ud800"
    ds.SeriesDescription = "PA\x00"
    with running_node(settings, registry) as node:
        assert store_all(node.port, [ds, ds]) == [0, 0]
    with registry.session() as session:
        study = session.scalars(select(Study)).one()
        assert (study.patient_name, study.patient_id) == ("DOE^JANE", "ID123")
        assert study.study_description == "CHEST PA?"
        assert study.instances[0].attributes["series_description"] == "PA"
    assert len(list(settings.spool_dir.glob("*/*.dcm"))) == 1


def test_values_the_database_refuses_leave_no_file(settings: Settings) -> None:
    """A DataError (a column narrowed below the value) or a CHECK violation is 0xC000, not 0xA700 on
    every retry, and the renamed spool file is removed again so spool and registry agree."""
    from contextlib import contextmanager

    from tests.conftest import _pg_schema_registry

    with contextmanager(_pg_schema_registry)() as registry:
        with registry.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE studies ALTER COLUMN patient_id TYPE varchar(2)")
            conn.exec_driver_sql(
                "ALTER TABLE studies ADD CONSTRAINT no_refuse CHECK (study_description IS DISTINCT FROM 'REFUSE ME')"
            )
        checked = make_cxr(rows=64, cols=64)
        checked.PatientID, checked.StudyDescription = "A", "REFUSE ME"
        with running_node(settings, registry) as node:
            assert store_all(node.port, [make_cxr(rows=64, cols=64), checked]) == [0xC000, 0xC000]
            assert echo(node.port)
        with registry.session() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == 0
    assert not list(Path(settings.spool_dir).glob("*/*.dcm"))
