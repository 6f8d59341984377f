"""Real DICOM peers for tests (pynetdicom): an SCU that stores and echoes (``store_all``, ``echo``), and a
C-STORE SCP that records what it gets (``StorePeer``), optionally over TLS (``self_signed``).

One place for the peer code: the node tests send with it, the export tests receive with it.
"""

from __future__ import annotations

import ssl
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import ComprehensiveSRStorage as SRStorage
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from radialog.settings import Destination


# -- sending (SCU) ----------------------------------------------------------------------------------------------
def scu(contexts: Sequence[tuple[str, str]], ae_title: str = "TESTSCU") -> AE:
    """An SCU proposing one presentation context per (SOP class, transfer syntax) pair, and Verification."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    ae.add_requested_context(Verification)
    return ae


def store_all(
    port: int, items: Sequence[Dataset | Path], *, called: str = "RADIALOG", calling: str = "TESTSCU"
) -> list[int | None]:
    """Send every item on one association; the status of each (None = no response)."""
    contexts = set()
    for item in items:
        if isinstance(item, Dataset):
            contexts.add((str(item.SOPClassUID), str(item.file_meta.TransferSyntaxUID)))
        else:
            meta, _ = split_dataset(item)
            contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    assoc = scu(sorted(contexts), calling).associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    statuses: list[int | None] = []
    try:
        for item in items:
            status = assoc.send_c_store(item)
            statuses.append(int(status.Status) if "Status" in status else None)
    finally:
        assoc.release()
    return statuses


def echo(port: int, called: str = "RADIALOG", calling: str = "TESTSCU") -> bool:
    """C-ECHO: whether the peer on ``port`` accepted the association and answered Success."""
    assoc = scu([], calling).associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and status.Status == 0
    finally:
        assoc.release()


# -- receiving (SCP) --------------------------------------------------------------------------------------------
#: Every storage SOP class pynetdicom knows: a PACS (or our node) that takes any image.
ALL_STORAGE: tuple[str, ...] = tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


class StorePeer:
    """A real pynetdicom C-STORE SCP (it answers C-ECHO too) on a free port, or on ``port``.

    ``accept`` is the SOP class(es) it accepts (SR by default; CT to refuse our SR at association,
    ``ALL_STORAGE`` for a PACS, ``(Verification,)`` for an echo-only peer) and ``status`` what it answers to each
    C-STORE (0x0000, or e.g. 0xA700 to refuse the instance); ``ssl_context`` makes it a DICOM TLS peer.
    ``received`` lists the SOP Instance UIDs stored, ``modalities`` their Modality, in order.
    """

    def __init__(
        self,
        *,
        ae_title: str = "PEER",
        accept: str | Sequence[str] = SRStorage,
        status: int = 0x0000,
        ssl_context: ssl.SSLContext | None = None,
        port: int = 0,
    ) -> None:
        self.ae_title = ae_title
        self.status = status
        self.received: list[str] = []
        self.modalities: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for sop_class in [accept] if isinstance(accept, str) else accept:
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=ssl_context,
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(str(event.dataset.SOPInstanceUID))
            self.modalities.append(str(event.dataset.get("Modality", "")))
        return self.status

    def stored(self) -> list[tuple[str, str]]:
        """(SOP Instance UID, Modality) of every instance stored so far."""
        with self._lock:
            return list(zip(self.received, self.modalities, strict=True))

    def destination(self, name: str) -> Destination:
        return Destination(name=name, ae_title=self.ae_title, host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


def self_signed(directory: Path, name: str = "peer") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (openssl): (certfile, keyfile)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
