"""Start the node in-process: the SCP (pynetdicom AE) plus the study assembler thread.

``start_node(settings, registry, enqueue)`` is what ``radialog node``, ``radialog run`` and the tests
call; it returns a :class:`RunningNode` with the bound ``port`` and ``stop()``.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event

from dicom_node import policy
from dicom_node.assembly import Enqueue, StudyAssembler
from dicom_node.guard import Limits, NodeAssociationServer, NodeRequestHandler
from dicom_node.recovery import recover_spool
from dicom_node.store import StoreContext, answer_unusable_store, handle_store
from dicom_node.streaming import IncomingStreams
from radialog.logging import get_logger
from radialog.registry import Registry
from radialog.settings import Settings

log = get_logger(__name__)


def build_ae(settings: Settings) -> AE:
    """The application entity: contexts, AE title checks, association limit and timeouts."""
    # pynetdicom's standard handlers format every PDU and DIMSE message for DEBUG lines we never write
    # (and would print datasets if we did): off, which also saves their cost on every PDU.
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=settings.ae_title)
    for sop_class in policy.STORAGE_CLASSES:
        ae.add_supported_context(sop_class, list(policy.TRANSFER_SYNTAXES))
    ae.add_supported_context(policy.VERIFICATION_CLASS, list(policy.TRANSFER_SYNTAXES[:3]))
    ae.require_called_aet = True
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.maximum_pdu_size = settings.max_pdu_bytes  # our Maximum Length; the guard refuses longer PDUs
    return ae


def _on_rejected(event: Event) -> None:
    """Log a refused association (AE titles and address only: no patient data exists at this point)."""
    requestor = event.assoc.requestor
    log.warning(
        "association rejected",
        extra={
            "calling_ae": requestor.ae_title,
            "called_ae": event.assoc.acceptor.ae_title,
            "address": requestor.address,
        },
    )


def _on_aborted(event: Event, store: StoreContext) -> None:
    store.take_studies(event.assoc)  # an aborted send is not a complete study: the quiet window decides
    log.info(
        "association aborted",
        extra={"calling_ae": event.assoc.requestor.ae_title, "address": event.assoc.requestor.address},
    )


def _on_released(event: Event, store: StoreContext, assembler: StudyAssembler) -> None:
    """A trusted router released its association: the studies it stored into are complete."""
    studies = store.take_studies(event.assoc)
    calling = (event.assoc.requestor.ae_title or "").strip()
    if studies and calling in {t.strip() for t in store.settings.trusted_routers}:
        log.info("trusted router released: studies complete", extra={"calling_ae": calling, "studies": sorted(studies)})
        assembler.complete(studies)


def _on_closed(event: Event, store: StoreContext) -> None:
    store.take_studies(event.assoc)


@dataclass
class RunningNode:
    """A started node: the association server, the assembler, and how to stop both."""

    ae: AE
    server: NodeAssociationServer
    assembler: StudyAssembler
    store: StoreContext

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop accepting, end running associations, stop the assembler."""
        self.assembler.stop()
        self.server.shutdown()
        self.ae.shutdown()


def _start_server(
    ae: AE,
    settings: Settings,
    handlers: list[Any],
    ssl_context: ssl.SSLContext | None,
) -> NodeAssociationServer:
    """``AE.start_server(block=False)`` with the guarded server class and request handler (dicom_node.guard)."""
    server = ae.make_server(
        (settings.dicom_host, settings.dicom_port),
        evt_handlers=handlers,
        server_class=NodeAssociationServer,
        request_handler=NodeRequestHandler,
        limits=Limits.from_settings(settings),
        networks=policy.parse_networks(settings.allowed_addresses),
        tls=ssl_context,
    )
    assert isinstance(server, NodeAssociationServer)  # make_server is typed with its default server class
    threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True).start()
    ae._servers.append(server)  # as start_server does: server.shutdown() and ae.shutdown() expect it there
    return server


def start_node(
    settings: Settings, registry: Registry, enqueue: Enqueue | None = None, *, assembler_interval: float = 0.5
) -> RunningNode:
    """Recover the spool, start the SCP on ``settings.dicom_host:dicom_port`` (0 = any free port)
    and the study assembler; returns at once."""
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    recover_spool(settings, registry)
    ae = build_ae(settings)
    streams = IncomingStreams(settings.spool_dir, settings.min_free_bytes, settings.max_instance_bytes)
    store = StoreContext(settings=settings, registry=registry, streams=streams)
    assembler = StudyAssembler(registry, settings, enqueue=enqueue, interval=assembler_interval)
    handlers = [
        (evt.EVT_PDU_RECV, streams.on_pdu_recv),
        (evt.EVT_CONN_CLOSE, streams.on_conn_close),
        (evt.EVT_CONN_CLOSE, _on_closed, [store]),
        (evt.EVT_C_STORE, handle_store, [store]),
        (evt.EVT_DIMSE_RECV, answer_unusable_store),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_ABORTED, _on_aborted, [store]),
        (evt.EVT_RELEASED, _on_released, [store, assembler]),
    ]
    ssl_context = policy.server_ssl_context(settings.tls) if settings.tls else None
    server = _start_server(ae, settings, handlers, ssl_context)
    assembler.start()
    node = RunningNode(ae=ae, server=server, assembler=assembler, store=store)
    log.info(
        "node listening",
        extra={
            "port": node.port,
            "ae_title": settings.ae_title,
            "tls": ssl_context is not None,
            "host": settings.dicom_host,
        },
    )
    return node
