"""The C-STORE handler: a received instance is answered Success only once it is durable and recorded.

Contract of :func:`handle_store` (bound to ``evt.EVT_C_STORE`` with a :class:`StoreContext`):

1. a dataset larger than ``settings.max_instance_bytes``, or free space below
   ``settings.min_free_bytes`` (checked for every fragment while it arrives, and before a dataset
   held in memory is written) -> ``0xA700`` out of resources, the standard's status for an SCP that
   cannot take the instance; the data beyond the limit were dropped as they arrived (``streaming``);
2. the bytes as received (file meta + the encoded dataset, pixel data never decoded) are in a fsynced
   temp file (streamed there while they arrived, see ``streaming``, or written from memory now), and
   the header is read from it without the pixel data;
3. an invalid SOP Instance / Study Instance UID -> ``0xC000`` (cannot understand), a dataset whose SOP
   class differs from the request's -> ``0xA900``; nothing is kept;
4. a SOP Instance UID already recorded for the same study -> Success, nothing new written (unless its
   spool file has gone missing: then it is restored); for another study -> ``0xC000`` with an error
   comment, the stored instance is never overwritten;
5. otherwise: atomic rename into ``<spool>/<study>/<sop>.dcm`` + directory fsync, then the registry
   commit (study upsert / re-open, instance row, ``last_instance_at``) -> Success;
6. any registry error -> ``0xA700``. A file renamed but not committed (crash or registry error) got no
   Success; start-up recovery records it, and the sender's retry is then a duplicate;
7. values the database refuses for good (``DataError``, a CHECK / NOT NULL violation, or a driver's
   ``ValueError``) -> ``0xC000``
   and the file just renamed is removed again, so no spool file is left without its registry row.
   Header text is cleaned before (``header``: NUL and control characters), so this is a last resort;
8. a C-STORE request without SOP Instance UID (or SOP Class UID, Priority), which pynetdicom would
   leave unanswered, is answered ``0xC000`` by :func:`answer_unusable_store`; an empty data set
   reaches the handler and is answered ``0xC000`` by step 3; the handler never raises
   (pynetdicom's 0xC211 path logs the exception with its message).
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from dicom_node import spool, streaming
from dicom_node.header import Header, read_header
from dicom_node.records import Seen, record_instance, seen_before
from dicom_node.streaming import IncomingStreams
from radialog.logging import get_logger, uid_ref
from radialog.registry import Registry, utcnow
from radialog.routing import STORE_PRIORITIES
from radialog.settings import Settings
from radialog.uids import is_valid_uid

log = get_logger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

_RECORD_ATTEMPTS = 3
#: Command elements pynetdicom requires of a C-STORE-RQ besides the Message ID (``is_valid_request``).
_REQUIRED = ("AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority")


@dataclass
class StoreContext:
    """What the handler needs: settings (spool, free-space floor) and the registry."""

    settings: Settings
    registry: Registry
    streams: IncomingStreams | None = None
    stored: int = field(default=0)
    streamed: int = field(default=0)  # of those, written while they arrived (see ``streaming``)
    #: Studies each association stored into (by association id), for trusted-router completion on release.
    studies_by_association: dict[int, set[int]] = field(default_factory=dict)

    def take_studies(self, association: object) -> set[int]:
        """The studies ``association`` stored into (forgotten once taken)."""
        return self.studies_by_association.pop(id(association), set())


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status


def db_error_kind(exc: BaseException) -> str:
    """A log-safe description of a database error: class names and SQLSTATE, never the message
    (messages can echo row values, i.e. patient data)."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlite_errorname", None)
    return ":".join(str(p) for p in (type(exc).__name__, type(orig).__name__ if orig else None, code) if p)


def _refused_values(ctx: StoreContext, renamed: str | None, ref: str | None, exc: BaseException) -> Dataset:
    """Not an outage: these values will never be recorded. Answer so, and leave no file behind."""
    if renamed is not None:
        (ctx.settings.spool_dir / renamed).unlink(missing_ok=True)
    log.error("store refused: values cannot be recorded", extra={"sop": ref, "error": db_error_kind(exc)})
    return _status(CANNOT_UNDERSTAND, "instance values cannot be recorded")


def is_race(exc: IntegrityError) -> bool:
    """A unique-key collision (another association inserted the same study or instance first), as
    opposed to a CHECK or NOT NULL violation, which the same values will hit again."""
    orig = exc.orig
    code = getattr(orig, "pgcode", None)
    if code is not None:
        return bool(code == "23505")  # unique_violation
    name = getattr(orig, "sqlite_errorname", None)
    return name is None or name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY")


def refused_for_good(exc: BaseException) -> bool:
    """True when the database refuses the values themselves (a retry cannot succeed): ``DataError``, a
    statement that failed before reaching the database, or a driver's ``ValueError`` (psycopg2: NUL)."""
    if isinstance(exc, (DataError, ValueError)):
        return True
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


def _request(event: Event) -> C_STORE:
    """The event's request: pynetdicom types ``Event.request`` as any DIMSE request; EVT_C_STORE's is a C-STORE."""
    return cast(C_STORE, event.request)


def _dataset_buffer(request: C_STORE) -> memoryview:
    """The received dataset bytes (a view): pynetdicom sets ``DataSet`` before it calls the handler."""
    dataset = request.DataSet
    assert isinstance(dataset, io.BytesIO)
    return dataset.getbuffer()


def _part10_chunks(event: Event) -> list[Any]:
    """Preamble, file meta and the received dataset bytes (a view, not a copy)."""
    meta = event.file_meta
    calling = event.assoc.requestor.ae_title
    if calling:
        meta.SourceApplicationEntityTitle = calling
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(DicomFileLike(buf), meta, enforce_standard=True)
    return [buf.getvalue(), _dataset_buffer(_request(event))]


def handle_store(event: Event, ctx: StoreContext) -> int | Dataset:
    """``evt.EVT_C_STORE`` handler; see the module docstring for the contract.

    Never raises: pynetdicom would answer 0xC211 and log the exception with its message (which can
    quote the data). Anything unforeseen is answered 0xA700 and logged by type.
    """
    try:
        return _store(event, ctx)
    except Exception:  # a bug must not become a 0xC211 with a traceback quoting the data
        log.exception("store failed")  # the traceback is logged without messages
        return _status(OUT_OF_RESOURCES, "the node could not process this instance")


def _store(event: Event, ctx: StoreContext) -> int | Dataset:
    started = time.perf_counter()
    request = _request(event)
    sop_uid = request.AffectedSOPInstanceUID
    ref = uid_ref(str(sop_uid)) if sop_uid else None
    refused = ctx.streams.refusal(event) if ctx.streams else None
    size = _dataset_buffer(request).nbytes
    limit = ctx.settings.max_instance_bytes
    if refused == streaming.SIZE or size > limit:
        log.warning(
            "store refused: instance larger than max_instance_bytes", extra={"sop": ref, "max_instance_bytes": limit}
        )
        return _status(OUT_OF_RESOURCES, f"instance larger than {limit} bytes")
    if refused == streaming.DISK:
        log.error(
            "store refused: spool disk below min_free_bytes while receiving",
            extra={"sop": ref, "min_free_bytes": ctx.settings.min_free_bytes},
        )
        return _status(OUT_OF_RESOURCES, "spool disk full")
    if not is_valid_uid(sop_uid):
        log.warning("store refused: invalid SOP Instance UID", extra={"status": "0xC000"})
        return _status(CANNOT_UNDERSTAND, "invalid SOP Instance UID")
    spool_dir = ctx.settings.spool_dir
    try:
        temp = ctx.streams.take(event, sop_uid, _dataset_buffer(request)) if ctx.streams else None
        streamed = temp is not None
        # A streamed file is on the disk already (each fragment was checked against the floor); a
        # dataset still in memory must leave the floor intact once written.
        needed = 0 if streamed else size
        free = spool.free_bytes(spool_dir)
        if free - needed < ctx.settings.min_free_bytes:
            log.error(
                "store refused: spool disk below min_free_bytes",
                extra={"sop": ref, "free_bytes": free, "min_free_bytes": ctx.settings.min_free_bytes},
            )
            if temp is not None:
                temp.unlink(missing_ok=True)
            return _status(OUT_OF_RESOURCES, "spool disk full")
        if temp is None:
            temp = spool.write_temp(spool_dir, _part10_chunks(event))
        ctx_timing = {"write_ms": round((time.perf_counter() - started) * 1000, 1), "streamed": streamed}
    except OSError as exc:
        log.error("store refused: cannot write spool file", extra={"sop": ref, "error": type(exc).__name__})
        return OUT_OF_RESOURCES
    try:
        return _validate_and_commit(event, ctx, temp, sop_uid, ref, size, started, ctx_timing)
    finally:
        temp.unlink(missing_ok=True)  # gone already after a successful rename


def answer_unusable_store(event: Event) -> None:
    """``evt.EVT_DIMSE_RECV``: answer the C-STORE requests pynetdicom would drop without a response.

    pynetdicom serves only requests with every required command element present and not empty; one
    without Affected SOP Instance UID, SOP Class UID or Priority is dropped with a warning, so the
    sender waits for its DIMSE timeout and retries the same. A request without data set reaches
    :func:`handle_store` (with an empty one) and is refused there. Called in
    the association's reader thread; ``send_msg`` only queues the response.
    """
    message = event.message
    if not isinstance(message, C_STORE_RQ):
        return
    command = message.command_set
    missing = [keyword for keyword in _REQUIRED if command.get(keyword) in (None, "")]
    if not missing or "MessageID" not in command or message.context_id is None:
        return  # served by handle_store, or nothing to answer to (the idle timer ends the association)
    response = C_STORE()
    response.MessageIDBeingRespondedTo = command.MessageID
    response.AffectedSOPClassUID = command.get("AffectedSOPClassUID") or None
    response.Status = CANNOT_UNDERSTAND
    response.ErrorComment = f"no {missing[0]}"  # type: ignore[assignment]  # pynetdicom's __init__ sets None; str | None
    log.warning("store refused: request without a required element", extra={"missing": missing, "status": "0xC000"})
    event.assoc.dimse.send_msg(response, message.context_id)


def _validate_and_commit(
    event: Event,
    ctx: StoreContext,
    temp: Path,
    sop_uid: str,
    ref: str | None,
    size: int,
    started: float,
    timing: dict[str, Any],
) -> int | Dataset:
    try:
        header = read_header(temp)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the sender's data, not our crash
        log.warning("store refused: header unreadable", extra={"sop": ref, "error": type(exc).__name__})
        return _status(CANNOT_UNDERSTAND, "dataset header cannot be parsed")
    if header.sop_instance_uid != sop_uid:
        log.warning("store refused: dataset SOP Instance UID differs from the request", extra={"sop": ref})
        return _status(CANNOT_UNDERSTAND, "SOP Instance UID differs from request")
    if header.sop_class_uid != request_class(event):
        log.warning("store refused: dataset SOP class differs from the request", extra={"sop": ref})
        return _status(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from request")
    if not is_valid_uid(header.study_instance_uid):
        log.warning("store refused: invalid Study Instance UID", extra={"sop": ref})
        return _status(CANNOT_UNDERSTAND, "invalid Study Instance UID")
    return _commit(event, ctx, temp, header, ref, size, started, timing)


def request_class(event: Event) -> str:
    return str(_request(event).AffectedSOPClassUID)


def _commit(
    event: Event,
    ctx: StoreContext,
    temp: Path,
    header: Header,
    ref: str | None,
    size: int,
    started: float,
    timing: dict[str, Any],
) -> int | Dataset:
    # The request's Priority (0000,0700), kept with the instance for the routing rules.
    store_priority = STORE_PRIORITIES.get(int(_request(event).Priority or 0), "MEDIUM")
    header = dataclasses.replace(header, attributes={**header.attributes, "store_priority": store_priority})
    assert header.study_instance_uid is not None and header.sop_instance_uid is not None
    rel_path = spool.relative_path(header.study_instance_uid, header.sop_instance_uid)
    calling = event.assoc.requestor.ae_title
    for attempt in range(1, _RECORD_ATTEMPTS + 1):
        renamed = False
        try:
            with ctx.registry.session() as session:
                seen = seen_before(session, header.sop_instance_uid, header.study_instance_uid)
                if seen is Seen.DUPLICATE:
                    _remember(ctx, event, session, header.study_instance_uid)
                    if not (ctx.settings.spool_dir / rel_path).is_file() and temp.exists():
                        # Recorded, but the file is gone (deleted by hand, or a lost rename): restore it.
                        spool.commit_file(ctx.settings.spool_dir, temp, rel_path)
                        log.warning("duplicate instance whose file was missing: restored", extra={"sop": ref})
                    else:
                        log.info("duplicate instance: already stored", extra={"sop": ref})
                    return SUCCESS
                if seen is Seen.CONFLICT:
                    log.warning(
                        "store refused: SOP Instance UID already stored for another study",
                        extra={"sop": ref, "study": uid_ref(header.study_instance_uid)},
                    )
                    return _status(CANNOT_UNDERSTAND, "SOP Instance UID already stored in another study")
                if temp.exists():
                    rename_started = time.perf_counter()
                    spool.commit_file(ctx.settings.spool_dir, temp, rel_path)
                    renamed = True
                    timing["rename_ms"] = round((time.perf_counter() - rename_started) * 1000, 1)
                study_id, instance_id = record_instance(
                    session,
                    header,
                    rel_path=rel_path,
                    size_bytes=temp_size(ctx, rel_path, size),
                    calling_ae_title=calling,
                    now=utcnow(),
                )
        except IntegrityError as exc:
            if is_race(exc):  # a concurrent association recorded the same study or instance first: look again
                log.info("registry race, retrying", extra={"sop": ref, "attempt": attempt, "error": db_error_kind(exc)})
                continue
            return _refused_values(ctx, rel_path if renamed else None, ref, exc)
        except (SQLAlchemyError, ValueError) as exc:
            if not refused_for_good(exc):
                log.error("store refused: registry error", extra={"sop": ref, "error": db_error_kind(exc)})
                return OUT_OF_RESOURCES
            return _refused_values(ctx, rel_path if renamed else None, ref, exc)
        except OSError as exc:
            log.error("store refused: cannot commit spool file", extra={"sop": ref, "error": type(exc).__name__})
            return OUT_OF_RESOURCES
        ctx.stored += 1
        ctx.streamed += bool(timing.get("streamed"))
        ctx.studies_by_association.setdefault(id(event.assoc), set()).add(study_id)
        log.info(
            "instance stored",
            extra={
                "sop": ref,
                "study_id": study_id,
                "instance_id": instance_id,
                "bytes": size,
                "ms": round((time.perf_counter() - started) * 1000, 1),
                **timing,
            },
        )
        return SUCCESS
    log.error("store refused: registry kept conflicting", extra={"sop": ref})
    return OUT_OF_RESOURCES


def _remember(ctx: StoreContext, event: Event, session: Any, study_uid: str) -> None:
    """A duplicate still belongs to the association's studies (a router resending a whole study)."""
    from sqlalchemy import select

    from radialog.registry import Study

    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    if study_id is not None:
        ctx.studies_by_association.setdefault(id(event.assoc), set()).add(study_id)


def temp_size(ctx: StoreContext, rel_path: str, dataset_size: int) -> int:
    """Size of the committed file (file meta included)."""
    try:
        return (ctx.settings.spool_dir / rel_path).stat().st_size
    except OSError:
        return dataset_size
