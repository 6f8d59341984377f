"""Association policy with real peers: AE titles, address allow-list, SOP classes, limits, TLS, bad input."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)
from pynetdicom import AE

from radialog.registry import Registry
from radialog.settings import Settings, TLSSettings
from radialog.synthetic import make_cxr
from tests.support.dicom_files import save
from tests.support.dicom_peers import echo, scu, self_signed, store_all
from tests.support.node import running_node, wait_idle


def test_called_and_calling_ae_titles(
    settings: Settings, sqlite_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    strict = settings.model_copy(update={"allowed_calling_aets": ["MODALITY1"]})
    with caplog.at_level(logging.WARNING), running_node(strict, sqlite_registry) as node:
        assert echo(node.port, calling="MODALITY1")
        assert not echo(node.port, calling="MODALITY1", called="SOMEONE")
        assert not echo(node.port, calling="INTRUDER")
    rejected = [r for r in caplog.records if r.getMessage() == "association rejected"]
    assert {r.calling_ae for r in rejected} == {"MODALITY1", "INTRUDER"}  # type: ignore[attr-defined]


def test_address_allow_list(settings: Settings, sqlite_registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    elsewhere = settings.model_copy(update={"allowed_addresses": ["10.0.0.0/8", "192.168.1.7"]})
    with caplog.at_level(logging.WARNING), running_node(elsewhere, sqlite_registry) as node:
        assert not echo(node.port)
    assert any(r.getMessage() == "connection refused: address not allowed" for r in caplog.records)
    local = settings.model_copy(update={"allowed_addresses": ["10.0.0.0/8", "127.0.0.0/8"]})
    with running_node(local, sqlite_registry) as node:
        assert echo(node.port)


def test_unsupported_sop_classes_rejected_at_negotiation(settings: Settings, sqlite_registry: Registry) -> None:
    ae = scu(
        [
            (ComputedRadiographyImageStorage, ExplicitVRLittleEndian),
            (CTImageStorage, ExplicitVRLittleEndian),
            (DigitalMammographyXRayImageStorageForPresentation, ExplicitVRLittleEndian),
        ]
    )
    with running_node(settings, sqlite_registry) as node:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RADIALOG")
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assoc.release()
    assert ComputedRadiographyImageStorage in accepted
    assert {CTImageStorage, DigitalMammographyXRayImageStorageForPresentation} <= rejected


def test_association_limit(settings: Settings, sqlite_registry: Registry) -> None:
    one = settings.model_copy(update={"max_associations": 1})
    with running_node(one, sqlite_registry) as node:
        first = scu([]).associate("127.0.0.1", node.port, ae_title="RADIALOG")
        assert first.is_established
        second = scu([]).associate("127.0.0.1", node.port, ae_title="RADIALOG")
        assert second.is_rejected
        first.release()
        wait_idle(node)
        assert echo(node.port)


def _associate_rq_pdu(called: bytes = b"RADIALOG") -> bytes:
    """A minimal A-ASSOCIATE-RQ header without items: enough to start a negotiation."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + b"GARBAGE".ljust(16) + b"\x00" * 32
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)) * 64,
        b"\x04\x00\xff\xff\xff\xff" + b"x" * 100,  # P-DATA claiming 4 GB before any association
        b"\x01\x00\x00\x00\x00\x10",  # truncated A-ASSOCIATE-RQ
        b"",  # connect and close at once
    ],
)
def test_garbage_on_the_socket_leaves_node_serving(
    settings: Settings, sqlite_registry: Registry, payload: bytes
) -> None:
    fast = settings.model_copy(update={"network_timeout": 2.0, "acse_timeout": 2.0})
    with running_node(fast, sqlite_registry) as node:
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(payload)
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(_associate_rq_pdu())
            sock.settimeout(10)
            try:
                sock.recv(1024)  # a reject or abort, or a closed connection
            except OSError:
                pass
        assert echo(node.port)
        assert store_all(node.port, [make_cxr(rows=32, cols=32)]) == [0]


def test_aborted_associations_leave_node_serving(tmp_path: Path, settings: Settings, sqlite_registry: Registry) -> None:
    ds = make_cxr(rows=512, cols=512)
    big = save(make_cxr(rows=2048, cols=2048), tmp_path, "big")
    with running_node(settings, sqlite_registry) as node:
        for _ in range(3):
            assoc = scu([(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)]).associate(
                "127.0.0.1", node.port, ae_title="RADIALOG"
            )
            assert assoc.is_established
            assoc.abort()
        # A sender killed while it streams an 8 MB dataset (wherever the kill lands, the node must go on).
        sender = subprocess.Popen(
            ["storescu", "-aec", "RADIALOG", "127.0.0.1", str(node.port)] + [str(big)] * 20,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while node.store.stored == 0 and sender.poll() is None:
            time.sleep(0.01)
        sender.kill()
        sender.wait()
        wait_idle(node)
        assert store_all(node.port, [ds]) == [0]
        assert echo(node.port)
    assert not list((settings.spool_dir / ".incoming").iterdir())


def test_tls(tmp_path: Path, settings: Settings, sqlite_registry: Registry) -> None:
    cert, key = self_signed(tmp_path, "localhost")
    secure = settings.model_copy(
        update={"tls": TLSSettings(certfile=cert, keyfile=key, ca_file=cert, require_client_cert=True)}
    )
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.load_cert_chain(str(cert), str(key))
    no_client_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    with running_node(secure, sqlite_registry) as node:
        ae = scu([(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RADIALOG", tls_args=(client, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_store(make_cxr(rows=32, cols=32)).Status == 0
        assoc.release()
        assert not echo(node.port), "plain DICOM must not get through a TLS port"
        anonymous = AE("TESTSCU")
        anonymous.add_requested_context("1.2.840.10008.1.1")
        try:
            refused = anonymous.associate(
                "127.0.0.1", node.port, ae_title="RADIALOG", tls_args=(no_client_cert, "localhost")
            )
            assert not refused.is_established
        except (ssl.SSLError, OSError):
            pass
        assert echo_tls(node.port, client)


def echo_tls(port: int, context: ssl.SSLContext, connection_timeout: float | None = None) -> bool:
    ae = scu([])
    ae.connection_timeout = connection_timeout  # TCP connect + TLS handshake
    assoc = ae.associate("127.0.0.1", port, ae_title="RADIALOG", tls_args=(context, "localhost"))
    ok = assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    return bool(ok)


def test_a_silent_client_cannot_stop_a_tls_node(tmp_path: Path, settings: Settings, sqlite_registry: Registry) -> None:
    """TCP connections that never start their TLS handshake do not hold the accept loop at all (the
    handshake runs in the connection's own thread; it used to block accepting for acse_timeout each)."""
    import socket

    cert, key = self_signed(tmp_path, "localhost")
    secure = settings.model_copy(
        update={
            "acse_timeout": 30.0,
            "tls": TLSSettings(certfile=cert, keyfile=key, ca_file=cert, require_client_cert=True),
        }
    )
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.load_cert_chain(str(cert), str(key))
    with running_node(secure, sqlite_registry) as node:
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
        try:
            time.sleep(0.2)  # the node has accepted them and waits for ClientHellos that never come
            # Still served while the silent connections stay open, well before their acse_timeout.
            assert echo_tls(node.port, client, connection_timeout=20)
        finally:
            for sock in silent:
                sock.close()
