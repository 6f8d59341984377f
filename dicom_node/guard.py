"""The node's network guard: every accepted socket is under a deadline from its first byte.

pynetdicom starts an association (two threads, one of the ``maximum_associations`` slots) for every
accepted TCP connection and reads each PDU with a blocking ``recv`` of the length the peer declared.
So a port scanner held a slot for the whole ACSE timeout, three bytes of a PDU header held one forever,
and a declared length of 300 MB was read into memory. Here, at pynetdicom's own extension points
(the server class and its request handler, and the transport socket they create):

* :class:`NodeAssociationServer` checks the source address in ``verify_request`` and keeps at most
  ``max_pending_connections`` connections that have not yet delivered their A-ASSOCIATE-RQ; at that
  cap the oldest is closed, so a flood of silent connections cannot keep a modality out.
* :class:`NodeRequestHandler` does the TLS handshake and reads the first PDU itself, in the
  connection's own thread, within ``acse_timeout`` of the accept; it must be an A-ASSOCIATE-RQ no longer
  than :data:`ASSOCIATE_RQ_LIMIT`. Only then does pynetdicom get an association: its slot count
  (``maximum_associations``) now counts peers that asked for an association, not sockets.
* :class:`GuardedSocket` (the association's transport) refuses a PDU whose declared length exceeds
  ``max_pdu_bytes`` before reading it (A-ABORT) and closes the connection when a PDU is not complete
  ``pdu_timeout`` seconds after its first byte. Silence *between* PDUs stays pynetdicom's network
  idle timer (``network_timeout``).

Errors are raised as :class:`PeerRefused` subclasses (``OSError``, so pynetdicom treats them as a
closed transport); they carry no peer data.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu import A_ASSOCIATE_RQ as A_ASSOCIATE_RQ_PDU
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node import policy
from radialog.logging import Throttled, get_logger
from radialog.settings import Settings

log = get_logger(__name__)

#: PDU type of an A-ASSOCIATE-RQ, the only PDU a peer may send first.
A_ASSOCIATE_RQ = 0x01
#: The longest A-ASSOCIATE-RQ read (128 presentation contexts with many transfer syntaxes fit easily).
ASSOCIATE_RQ_LIMIT = 256 * 1024
_HEADER = struct.Struct(">BBL")
#: A-ABORT reason "invalid PDU parameter value" (PS3.8 table 9-26), source: service provider.
_ABORT_INVALID_PARAMETER = 0x06


class PeerRefused(OSError):
    """The guard closed a connection; the subclass says why (no peer data in the message)."""


class PDUIncomplete(PeerRefused, TimeoutError):
    """A PDU (or the first one, the A-ASSOCIATE-RQ) did not arrive whole within its deadline."""


class PDUTooLong(PeerRefused):
    """The peer declared a PDU longer than the node receives."""


class NotAnAssociationRequest(PeerRefused):
    """The first PDU of a connection was not an A-ASSOCIATE-RQ."""


class MalformedAssociationRequest(PeerRefused):
    """The A-ASSOCIATE-RQ cannot be decoded (pynetdicom would abort it, then hold an association
    thread, counted against ``maximum_associations``, for the whole ACSE timeout)."""


class PeerClosed(PeerRefused):
    """The peer closed the connection before its A-ASSOCIATE-RQ was complete."""


class Evicted(PeerRefused):
    """Closed to make room: too many connections were waiting for their A-ASSOCIATE-RQ."""


@dataclass(frozen=True)
class Limits:
    """The guard's bounds, from settings (see README, "The DICOM node")."""

    handshake_timeout: float  # accept -> A-ASSOCIATE-RQ complete (TLS handshake included)
    pdu_timeout: float  # first byte -> last byte of one PDU
    max_pdu_bytes: int  # longest P-DATA-TF (and other PDU) accepted once associated
    max_pending: int  # connections without an A-ASSOCIATE-RQ yet

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            handshake_timeout=settings.acse_timeout,
            pdu_timeout=settings.pdu_timeout,
            max_pdu_bytes=settings.max_pdu_bytes,
            max_pending=settings.max_pending_connections,
        )

    def longest(self, pdu_type: int) -> int:
        """The longest declared PDU length accepted for ``pdu_type`` on an established association."""
        return max(self.max_pdu_bytes, ASSOCIATE_RQ_LIMIT) if pdu_type == A_ASSOCIATE_RQ else self.max_pdu_bytes


def read_exact(sock: socket.socket, size: int, deadline: float, *, evicted: threading.Event | None = None) -> bytearray:
    """``size`` bytes from ``sock`` by ``deadline`` (monotonic); fewer only when the peer closed.

    Raises :class:`PDUIncomplete` at the deadline. ``size`` is already bounded by the caller, so the
    buffer is allocated once and filled in place (no 4 KB reads and copies).
    """
    buffer = bytearray(size)
    got = 0
    with memoryview(buffer) as view:
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PDUIncomplete("PDU not complete within its deadline")
            sock.settimeout(left)
            try:
                count = sock.recv_into(view[got:])
            except TimeoutError:
                raise PDUIncomplete("PDU not complete within its deadline") from None
            if count == 0:
                if evicted is not None and evicted.is_set():
                    raise Evicted("closed to make room for new connections")
                break
            got += count
    if got < size:
        del buffer[got:]
    return buffer


def send_abort(sock: socket.socket) -> None:
    """Best effort: tell the peer why we close (A-ABORT, service provider, invalid PDU parameter)."""
    pdu = A_ABORT_RQ()
    pdu.source = 0x02
    pdu.reason_diagnostic = _ABORT_INVALID_PARAMETER
    try:
        sock.settimeout(1.0)
        sock.sendall(pdu.encode())
    except OSError:
        pass


def read_first_pdu(sock: socket.socket, deadline: float, evicted: threading.Event | None = None) -> bytes:
    """The connection's first PDU, which must be an A-ASSOCIATE-RQ of at most ASSOCIATE_RQ_LIMIT bytes."""
    header = read_exact(sock, _HEADER.size, deadline, evicted=evicted)
    if len(header) < _HEADER.size:
        raise PeerClosed("closed before an A-ASSOCIATE-RQ")
    pdu_type, _, length = _HEADER.unpack(header)
    if pdu_type != A_ASSOCIATE_RQ:
        send_abort(sock)
        raise NotAnAssociationRequest(f"first PDU has type 0x{pdu_type:02X}")
    if length > ASSOCIATE_RQ_LIMIT:
        send_abort(sock)
        raise PDUTooLong(f"A-ASSOCIATE-RQ declares {length} bytes")
    body = read_exact(sock, length, deadline, evicted=evicted)
    if len(body) < length:
        raise PeerClosed("closed before an A-ASSOCIATE-RQ")
    first = bytes(header + body)
    try:
        A_ASSOCIATE_RQ_PDU().decode(first)
    except Exception:  # noqa: BLE001 - any decoding failure: pynetdicom would abort and linger acse_timeout
        send_abort(sock)
        raise MalformedAssociationRequest("A-ASSOCIATE-RQ cannot be decoded") from None
    return first


def tls_handshake(context: ssl.SSLContext, sock: socket.socket, deadline: float) -> ssl.SSLSocket:
    """The server side of a TLS handshake that must end by ``deadline`` (not per read: in total)."""
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    tls.setblocking(False)
    while True:
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            wait: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]] = ([tls], [])
        except ssl.SSLWantWriteError:
            wait = ([], [tls])
        left = deadline - time.monotonic()
        if left <= 0 or not any(select.select(*wait, [], left)):
            tls.close()
            raise PDUIncomplete("TLS handshake not complete within acse_timeout")


class GuardedSocket(AssociationSocket):
    """pynetdicom's transport socket with bounded PDUs and per-PDU deadlines.

    pynetdicom's DUL reads every PDU as ``recv(6)`` (type, reserved, length) then ``recv(length)``;
    the header call starts the PDU's deadline and checks the declared length. The A-ASSOCIATE-RQ the
    request handler already read is served first.
    """

    def __init__(
        self, assoc: Association, client_socket: socket.socket, limits: Limits, first_pdu: bytes, refusals: Throttled
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._limits = limits
        self._refusals = refusals
        self._buffered = bytearray(first_pdu)
        self._deadline: float | None = None  # of the PDU whose body comes next; None between PDUs

    @property
    def ready(self) -> bool:
        return bool(self._buffered) or bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]  # a property

    def recv(self, nr_bytes: int) -> bytearray:
        if self._buffered:
            data = self._buffered[:nr_bytes]
            del self._buffered[:nr_bytes]
            return data
        sock = self.socket
        assert sock is not None
        try:
            if self._deadline is None:  # a PDU header: the PDU starts now
                deadline = time.monotonic() + self._limits.pdu_timeout
                data = read_exact(sock, nr_bytes, deadline)
                if len(data) == _HEADER.size:
                    pdu_type, _, length = _HEADER.unpack(data)
                    if length > self._limits.longest(pdu_type):
                        send_abort(sock)
                        self._refusals.warning(
                            "association aborted: PDU longer than max_pdu_bytes",
                            address=self.assoc.requestor.address,
                            declared=length,
                        )
                        raise PDUTooLong(f"PDU declares {length} bytes")
                    self._deadline = deadline
                return data
            deadline, self._deadline = self._deadline, None
            return read_exact(sock, nr_bytes, deadline)
        except PDUIncomplete:
            self._refusals.warning(
                "association aborted: PDU incomplete after pdu_timeout", address=self.assoc.requestor.address
            )
            raise
        finally:
            try:
                sock.settimeout(self._limits.pdu_timeout)  # sends must not block forever either
            except OSError:  # closed meanwhile
                pass


@dataclass
class _Pending:
    """A connection that has not yet delivered its A-ASSOCIATE-RQ."""

    accepted: float
    fd: int
    evicted: threading.Event = field(default_factory=threading.Event)


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the address allow-list and the cap on pending connections.

    Made with ``AE.make_server(..., server_class=NodeAssociationServer, request_handler=
    NodeRequestHandler, limits=..., networks=..., tls=...)``; pynetdicom's own ``ssl_context`` stays
    None because the handshake happens in the connection's thread (it used to block the accept loop).
    """

    #: listen() backlog: socketserver's default of 5 drops SYNs during a burst of connections, and a
    #: dropped SYN is retried after 1, 3, 7 ... s: a modality would wait out the attacker's burst.
    request_queue_size = 128

    def __init__(
        self,
        *args: Any,
        limits: Limits,
        networks: list[policy.Network],
        tls: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        self.limits = limits
        self.networks = networks
        self.tls = tls
        self._pending: OrderedDict[socket.socket, _Pending] = OrderedDict()
        self._pending_lock = threading.Lock()
        self.evicted = 0
        self.refusals = Throttled(log, interval=10.0)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only; TLS and everything else happen in the connection's thread.

        Out of file descriptors (the process shares them with the API in ``radialog run``) the
        pending connection stays in the backlog; pause briefly instead of spinning on it.
        """
        assert self.socket is not None
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.refusals.warning("cannot accept: out of file descriptors or memory", error=exc.errno)
                time.sleep(0.1)
            raise  # socketserver drops this attempt and goes on serving

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Address allow-list, then register the connection as pending (closing the oldest at the cap)."""
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if self.networks and not policy.address_allowed(host, self.networks):
            self.refusals.warning("connection refused: address not allowed", address=host)
            return False
        with self._pending_lock:
            while len(self._pending) >= self.limits.max_pending:
                _, oldest = self._pending.popitem(last=False)
                oldest.evicted.set()
                _shutdown_fd(oldest.fd)
                self.evicted += 1
            self._pending[request] = _Pending(accepted=time.monotonic(), fd=request.fileno())
        return True

    def pending(self, request: socket.socket) -> _Pending | None:
        with self._pending_lock:
            return self._pending.get(request)

    def settle(self, request: socket.socket) -> None:
        """The connection is no longer pending (associated, or about to be closed by its handler)."""
        with self._pending_lock:
            self._pending.pop(request, None)

    @property
    def pending_count(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints the traceback to stderr; log the type only (no peer data)."""
        import sys

        exc = sys.exc_info()[1]
        log.error("connection handler failed", extra={"error": type(exc).__name__})

    def server_close(self) -> None:
        """Close connections still waiting for their A-ASSOCIATE-RQ, then the server (joins handlers)."""
        with self._pending_lock:
            for entry in self._pending.values():
                entry.evicted.set()
                _shutdown_fd(entry.fd)
        super().server_close()


def _shutdown_fd(fd: int) -> None:
    """Shut down (not close) a socket by descriptor, so its own thread wakes up and closes it.

    Called under the server's pending lock: the handler settles (leaves the table) before it closes its
    socket, so the descriptor is still that connection's.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


class NodeRequestHandler(RequestHandler):
    """Per connection: TLS, then the A-ASSOCIATE-RQ within ``acse_timeout``; then pynetdicom's association."""

    server: NodeAssociationServer

    def handle(self) -> None:
        server = self.server
        raw = self.request
        entry = server.pending(raw)
        if entry is None:  # evicted between accept and now
            server.shutdown_request(raw)
            return
        sock: socket.socket = raw
        try:
            deadline = entry.accepted + server.limits.handshake_timeout
            if server.tls is not None:
                sock = tls_handshake(server.tls, raw, deadline)
            first = read_first_pdu(sock, deadline, entry.evicted)
        except (OSError, ValueError) as exc:  # PeerRefused, ssl.SSLError, a reset connection
            server.settle(raw)
            _close(sock)
            reason = "evicted" if entry.evicted.is_set() else type(exc).__name__
            server.refusals.info("connection closed before association", address=self.client_address[0], reason=reason)
            return
        server.settle(raw)
        sock.settimeout(server.limits.pdu_timeout)
        assoc = self._association(sock, first)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()

    def _association(self, sock: socket.socket, first_pdu: bytes) -> Association:
        """An acceptor Association on the guarded socket, configured as pynetdicom's handler does."""
        ae = self.ae
        assoc = Association(ae, MODE_ACCEPTOR)
        assoc._server = self.server  # pynetdicom closes the socket through its server at the end
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"  # noqa: DTZ005 - local, as pynetdicom names it
        assoc.set_socket(GuardedSocket(assoc, sock, self.server.limits, first_pdu, self.server.refusals))
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:  # type: ignore[misc]  # notification: (handler, args) pairs
                    assoc.bind(event, handler, args)
        return assoc


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
