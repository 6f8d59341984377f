"""Write a C-STORE dataset to the spool *while it arrives*, so disk and network work at the same time.

Without this, the C-STORE handler gets the whole dataset in memory and only then writes and fsyncs it:
network time + disk time per instance. Here an ``evt.EVT_PDU_RECV`` handler (pynetdicom calls it in
the association's reader thread for every PDU, before the PDU reaches the DIMSE layer) appends each
dataset fragment to a temp file in ``<spool>/.incoming`` and asks the kernel to start writing it back
every few MB (``sync_file_range``), so the handler's final ``fdatasync`` has little left to wait for.

Contract: this is only a faster way to the same bytes. :meth:`IncomingStreams.take` hands a file to the
C-STORE handler only when it is complete, belongs to the request's SOP Instance UID, and its dataset
has the length of the bytes pynetdicom assembled in memory and equals them at 64 evenly spaced 4 KB
windows (first and last included); anything else (an error here, an unusual
PDU order) discards the file and the handler writes from memory as before.

Limits, enforced here because this is the one place that sees each fragment before pynetdicom keeps it:

* ``max_instance_bytes``: once a message's dataset passes it, the file is discarded and every further
  dataset fragment is cut to its control byte before pynetdicom assembles it, so the association's
  memory stays bounded however much the peer sends; the C-STORE handler then answers 0xA700.
* ``min_free_bytes``: no fragment is written if the spool's free space would fall below the floor; the
  rest of the message is dropped the same way and the handler answers 0xA700.

A refusal is recorded per association *and* Message ID (:meth:`IncomingStreams.refusal`), so a peer
that sends its next request before our answer cannot make the handler take a cut dataset for a whole one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import decode
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF

from dicom_node import spool
from radialog.logging import get_logger

log = get_logger(__name__)

_C_STORE_RQ = 0x0001
_NO_DATASET = 0x0101
_WRITEBACK_EVERY = 4 * 1024 * 1024
_SAMPLES = 64
_WINDOW = 4096


def _sync_file_range() -> Any:
    """libc ``sync_file_range`` (Linux), or None: start writeback of a range without waiting."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _free(fd: int) -> int:
    """Free bytes (as ``shutil.disk_usage`` counts them) on the file system of an open file: one call."""
    stat = os.fstatvfs(fd)
    return stat.f_bavail * stat.f_frsize


@dataclass
class _Stream:
    """One association's dataset in progress."""

    command: bytearray = field(default_factory=bytearray)
    message_id: int | None = None
    dataset_bytes: int = 0  # of the current message, written or not
    refused: str | None = None  # SIZE or DISK once the current message's data are being dropped
    sop_instance_uid: str | None = None
    fd: int | None = None
    path: Path | None = None
    header_size: int = 0
    written: int = 0
    flushed: int = 0
    complete: bool = False

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        self.complete = False
        self.sop_instance_uid = None


#: Why a message's data are dropped (see :meth:`IncomingStreams.refusal`).
SIZE = "size"
DISK = "disk"


class IncomingStreams:
    """Per-association spool writers fed by ``on_pdu_recv`` and taken by the C-STORE handler."""

    def __init__(self, spool_dir: Path, min_free_bytes: int = 0, max_instance_bytes: int | None = None) -> None:
        self.spool_dir = spool_dir
        self.min_free_bytes = min_free_bytes
        self.max_instance_bytes = max_instance_bytes
        self._streams: dict[int, _Stream] = {}
        self._refused: Counter[tuple[int, int | None, str]] = Counter()
        self._lock = threading.Lock()

    # -- evt.EVT_PDU_RECV -----------------------------------------------------------------------
    def on_pdu_recv(self, event: Event) -> None:
        """Append dataset fragments of a C-STORE request to its temp file (never raises)."""
        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF):
            return
        key = id(event.assoc)
        with self._lock:
            stream = self._streams.setdefault(key, _Stream())
        for item in pdu.presentation_data_value_items:
            value = item.presentation_data_value
            if not value:
                continue
            try:
                self._fragment(event, stream, item.presentation_context_id, value)
            except Exception as exc:  # noqa: BLE001 - the memory path still has the data
                log.warning("streaming to spool failed; storing from memory", extra={"error": type(exc).__name__})
                stream.discard()
                stream.command.clear()
            if stream.refused and not value[0] & 1:
                item.presentation_data_value = value[:1]  # keep the control byte: the message still ends

    def _fragment(self, event: Event, stream: _Stream, context_id: int | None, value: bytes) -> None:
        control, data = value[0], memoryview(value)[1:]
        if control & 1:  # command fragment
            if stream.complete or stream.fd is not None or stream.dataset_bytes or stream.refused:
                stream.discard()  # a new message while the last one was not taken
                stream.dataset_bytes, stream.refused, stream.message_id = 0, None, None
            stream.command.extend(data)
            if control & 2:
                self._open(event, stream, context_id)
            return
        stream.dataset_bytes += len(data)
        if stream.refused:
            return
        if self.max_instance_bytes is not None and stream.dataset_bytes > self.max_instance_bytes:
            self._refuse(event, stream, SIZE)
            return
        if stream.fd is None:
            return
        if self.min_free_bytes and _free(stream.fd) - len(data) < self.min_free_bytes:
            self._refuse(event, stream, DISK)
            return
        view = data
        while view:
            view = view[os.write(stream.fd, view) :]
        stream.written += len(data)
        if _SYNC_FILE_RANGE is not None and stream.written - stream.flushed >= _WRITEBACK_EVERY:
            _SYNC_FILE_RANGE(
                stream.fd, stream.header_size + stream.flushed, stream.written - stream.flushed, _SYNC_FILE_RANGE_WRITE
            )
            stream.flushed = stream.written
        if control & 2:
            stream.complete = True

    def _refuse(self, event: Event, stream: _Stream, reason: str) -> None:
        """Drop the rest of this message's data (see the module docstring); the handler answers 0xA700."""
        stream.discard()
        stream.refused = reason
        with self._lock:
            self._refused[(id(event.assoc), stream.message_id, reason)] += 1

    def refusal(self, event: Event) -> str | None:
        """SIZE or DISK when this request's data were dropped while they arrived (then the stream is
        discarded), else None. Called by the C-STORE handler before anything else."""
        key = id(event.assoc)
        message_id = event.request.MessageID
        with self._lock:
            for reason in (SIZE, DISK):
                if self._refused[(key, message_id, reason)] > 0:
                    self._refused[(key, message_id, reason)] -= 1
                    self._refused += Counter()  # drop zero counts
                    stream = self._streams.get(key)
                    if stream is not None and stream.refused and stream.message_id == message_id:
                        del self._streams[key]  # this message's stream (not a next one already arriving)
                    else:
                        stream = None
                    break
            else:
                return None
        if stream is not None:
            stream.discard()
        return reason

    def _open(self, event: Event, stream: _Stream, context_id: int | None) -> None:
        command = decode(BytesIO(stream.command), True, True)
        stream.command.clear()
        stream.message_id = command.get("MessageID")
        if command.get("CommandField") != _C_STORE_RQ or command.get("CommandDataSetType") == _NO_DATASET:
            return
        if not command.get("AffectedSOPInstanceUID") or not command.get("AffectedSOPClassUID"):
            return  # answered by store.answer_unusable_store (or refused by the handler)
        contexts = {cx.context_id: cx for cx in event.assoc.accepted_contexts}
        if context_id not in contexts:
            return
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = command.AffectedSOPClassUID
        meta.MediaStorageSOPInstanceUID = command.AffectedSOPInstanceUID
        meta.TransferSyntaxUID = contexts[context_id].transfer_syntax[0]
        meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
        calling = event.assoc.requestor.ae_title
        if calling:
            meta.SourceApplicationEntityTitle = calling
        if spool.free_bytes(self.spool_dir) < self.min_free_bytes:
            self._refuse(event, stream, DISK)
            return
        incoming = self.spool_dir / spool.INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=incoming, suffix=".part")
        stream.fd, stream.path = fd, Path(name)
        stream.sop_instance_uid = str(command.AffectedSOPInstanceUID)
        with open(fd, "wb", closefd=False) as fh:
            fh.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(DicomFileLike(fh), meta, enforce_standard=True)
            stream.header_size = fh.tell()
        stream.written = stream.flushed = 0
        stream.complete = False

    # -- the C-STORE handler's side -------------------------------------------------------------
    def take(self, event: Event, sop_instance_uid: str, dataset: memoryview) -> Path | None:
        """The fsynced temp file holding exactly this request's dataset, or None (write from memory)."""
        # Taken out of the table: from here this thread alone owns the stream, so EVT_CONN_CLOSE (the
        # reader thread) cannot close the same file descriptor a second time; the next request's PDUs
        # start a new stream.
        with self._lock:
            stream = self._streams.pop(id(event.assoc), None)
        if stream is None or stream.fd is None or stream.path is None:
            return None
        try:
            if not (
                stream.complete
                and stream.sop_instance_uid == sop_instance_uid
                and stream.written == len(dataset)
                and self._same(stream, dataset)
            ):
                log.warning("streamed dataset does not match; storing from memory")
                return None
            os.fdatasync(stream.fd)
            path, stream.path = stream.path, None
            return path
        except OSError as exc:
            log.warning("streamed dataset unusable; storing from memory", extra={"error": type(exc).__name__})
            return None
        finally:
            stream.discard()

    @staticmethod
    def _same(stream: _Stream, dataset: memoryview) -> bool:
        """Compare the file with pynetdicom's copy at evenly spaced windows (first and last included).

        Both copies are built from the same fragments in the same order; this catches a lost, doubled
        or misplaced fragment without reading 10 MB twice on every store.
        """
        assert stream.fd is not None
        size = len(dataset)
        step = max(size // _SAMPLES, 1)
        for offset in sorted({*range(0, size, step), max(size - _WINDOW, 0)}):
            end = min(offset + _WINDOW, size)
            if os.pread(stream.fd, end - offset, stream.header_size + offset) != dataset[offset:end]:
                return False
        return True

    # -- evt.EVT_CONN_CLOSE ---------------------------------------------------------------------
    def on_conn_close(self, event: Event) -> None:
        """Drop whatever the association left unfinished (an aborted send)."""
        key = id(event.assoc)
        with self._lock:
            stream = self._streams.pop(key, None)
            for refused in [k for k in self._refused if k[0] == key]:
                del self._refused[refused]
        if stream is not None:
            stream.discard()
