"""A DICOM peer written byte by byte, for the hostile-peer suite (bench/hostile.py, tests/test_node_hostile.py).

pynetdicom's SCU cannot send a partial PDU, lie about a PDU length, leave a C-STORE without its SOP
Instance UID or data set, or trickle bytes; these helpers build the PDUs of PS3.8 by hand so a test
can do exactly that, and speak just enough of the protocol to associate, store and release.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"  # any valid UID: this is a test peer
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(
    called: str = "RADIALOG",
    calling: str = "HOSTILE",
    contexts: tuple[str, ...] = (CR_STORAGE, VERIFICATION),
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing each abstract syntax (context ids 1, 3, 5 ...) with explicit VR LE."""
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + b"\x00" * 32
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for index, abstract in enumerate(contexts):
        sub = _item(0x30, abstract.encode()) + _item(0x40, EXPLICIT_VR_LE.encode())
        body += _item(0x20, struct.pack(">BBBB", 2 * index + 1, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode())
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU (type, body); raises ConnectionError when the peer closed first."""
    header = _recv_exact(sock, 6)
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def closed_by_peer(sock: socket.socket, wait: float) -> bool:
    """True when the peer closes (or aborts) the connection within ``wait`` seconds; reads what comes."""
    sock.settimeout(wait)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def command_bytes(ds: Dataset) -> bytes:
    """A DIMSE command set, implicit VR little endian, with its group length."""
    body = encode(ds, True, True)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def c_store_rq(
    message_id: int, sop_instance: str | None, *, sop_class: str = CR_STORAGE, with_dataset: bool = True
) -> bytes:
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = 0x0001
    ds.MessageID = message_id
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000 if with_dataset else 0x0101
    if sop_instance is not None:
        ds.AffectedSOPInstanceUID = sop_instance
    return command_bytes(ds)


def p_data(context_id: int, *fragments: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF PDU with one PDV per (message control header, bytes) fragment."""
    body = b"".join(
        struct.pack(">LB", len(data) + 2, context_id) + bytes([control]) + data for control, data in fragments
    )
    return pdu(P_DATA_TF, body)


@dataclass
class Peer:
    """One raw association: ``Peer.associate(port)``, then ``store`` / ``send`` / ``release``."""

    sock: socket.socket
    max_pdu: int = 16384

    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> Peer:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(timeout)
        return cls(sock)

    @classmethod
    def associate(cls, port: int, *, called: str = "RADIALOG", timeout: float = 30.0) -> Peer:
        peer = cls.connect(port, timeout=timeout)
        peer.sock.sendall(associate_rq(called=called))
        pdu_type, body = read_pdu(peer.sock)
        if pdu_type != A_ASSOCIATE_AC:
            peer.close()
            raise ConnectionRefusedError(f"association not accepted (PDU type 0x{pdu_type:02X})")
        peer.max_pdu = _max_length(body) or 1 << 20
        return peer

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def store(
        self, message_id: int, sop_instance: str | None, dataset: bytes | None, *, sop_class: str = CR_STORAGE
    ) -> int:
        """Send one C-STORE-RQ on context 1 (dataset None = "no data set" in the command) and return
        the response status; raises TimeoutError when no response comes."""
        self.send_store(message_id, sop_instance, dataset, sop_class=sop_class)
        return self.response_status()

    def send_store(
        self, message_id: int, sop_instance: str | None, dataset: bytes | None, *, sop_class: str = CR_STORAGE
    ) -> None:
        """Send a C-STORE-RQ without waiting for its response (a peer that pipelines its requests)."""
        command = c_store_rq(message_id, sop_instance, sop_class=sop_class, with_dataset=dataset is not None)
        self.send(p_data(1, (0x03, command)))
        if dataset is not None:
            step = max(self.max_pdu - 12, 1024)
            chunks = [dataset[i : i + step] for i in range(0, len(dataset), step)] or [b""]
            for index, chunk in enumerate(chunks):
                self.send(p_data(1, (0x02 if index == len(chunks) - 1 else 0x00, chunk)))

    def response_status(self) -> int:
        command = bytearray()
        while True:
            pdu_type, body = read_pdu(self.sock)
            if pdu_type != P_DATA_TF:
                raise ConnectionError(f"PDU type 0x{pdu_type:02X} instead of a response")
            offset = 0
            while offset < len(body):
                length, _context = struct.unpack(">LB", body[offset : offset + 5])
                control = body[offset + 5]
                command += body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x03 == 0x03:
                    return int(decode(_as_file(bytes(command)), True, True).Status)

    def release(self) -> None:
        try:
            self.send(pdu(A_RELEASE_RQ, b"\x00" * 4))
            read_pdu(self.sock)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _as_file(data: bytes):  # type: ignore[no-untyped-def]
    from io import BytesIO

    return BytesIO(data)


def _max_length(body: bytes) -> int | None:
    """The Maximum Length the acceptor announced in its A-ASSOCIATE-AC."""
    offset = 68
    while offset + 4 <= len(body):
        item_type, _, length = struct.unpack(">BBH", body[offset : offset + 4])
        value = body[offset + 4 : offset + 4 + length]
        if item_type == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                sub_type, _, sub_length = struct.unpack(">BBH", value[sub : sub + 4])
                if sub_type == 0x51:
                    return int(struct.unpack(">L", value[sub + 4 : sub + 8])[0])
                sub += 4 + sub_length
        offset += 4 + length
    return None


def trickle(sock: socket.socket, data: bytes, interval: float) -> int:
    """Send ``data`` one byte per ``interval`` seconds until done or the peer closes; bytes sent."""
    sent = 0
    try:
        for byte in data:
            sock.sendall(bytes([byte]))
            sent += 1
            time.sleep(interval)
    except OSError:
        pass
    return sent
