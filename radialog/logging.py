"""Structured JSON logging without patient data, for our loggers and third-party ones alike.

Use ``log = get_logger(__name__)`` and ``log.info("event name", extra={"study": study_id})``. Only the
registry's numeric ids and short hashes of UIDs go into logs. Because libraries (pydicom, highdicom,
pynetdicom, Celery, uvicorn, SQLAlchemy ...) build their own messages, ``configure`` also makes every
record safe where it is created, whatever handler writes it:

* exception *messages* never reach a log: a traceback is written as exception types and frames
  (file, line, function), and the texts of the record's exceptions are cut out of its message,
  arguments and extra values (Celery copies ``repr(exc)`` and the formatted traceback into both);
* pydicom and highdicom messages are withheld entirely (they quote header values, e.g. pydicom's
  "Invalid value for VR UI: '<240 bytes of the header>'");
* Python warnings are logged as category and location only (highdicom warns with the patient name,
  pydicom with the value it rejects), instead of going to stderr, also when a library routes them
  through ``logging.captureWarnings`` (Celery's worker does);
* uncaught exceptions in threads and the main thread are logged the same way (the default hooks print
  the message to stderr);
* extra keys that name patient data are dropped (``PHIFilter``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

#: Extra keys that are never written, even if a caller passes them.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patientname",
        "patientid",
        "accession",
        "accession_number",
        "birth_date",
        "patient_birth_date",
        "study_description",
        "referring_physician",
    }
)
#: Loggers whose message text is withheld: their messages quote DICOM values.
WITHHELD_LOGGERS = ("pydicom", "highdicom")
WITHHELD = "message withheld: this library's messages can quote DICOM header values"
WARNING_WITHHELD = "warning (text withheld)"
#: The head of a warning as ``warnings.formatwarning`` writes it: "<file>:<line>: <Category>: <text>".
_WARNING_PREFIX = re.compile(r"(?P<where>\S.*?:\d+): (?P<category>\w+): ")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_EXC_TEXTS = "_radialog_exc_texts"


def uid_ref(uid: str | None) -> str | None:
    """A short, stable, non-reversible reference to a UID for log lines."""
    if not uid:
        return None
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


# -- making a record safe -----------------------------------------------------------------------------


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """An exception and its causes / contexts, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _type_name(exc: BaseException | type[BaseException]) -> str:
    cls = exc if isinstance(exc, type) else type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def safe_traceback(exc: BaseException) -> str:
    """A traceback without exception messages: types and frames (source lines are code, not data)."""
    parts: list[str] = []
    for link in reversed(list(_chain(exc))):
        if parts:
            parts.append("The above exception led to:")
        parts.append("Traceback (most recent call last):")
        for frame in traceback.extract_tb(link.__traceback__):
            parts.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
            if frame.line:
                parts.append(f"    {frame.line.strip()}")
        parts.append(f"{_type_name(link)} (message withheld)")
    return "\n".join(parts)


def _exception_texts(*excs: BaseException | None) -> list[tuple[str, str]]:
    """(text, replacement) for every message/representation of the chains, longest first."""
    texts: dict[str, str] = {}
    for exc in excs:
        for link in _chain(exc):
            label = f"<{_type_name(link)}>"
            for text in (repr(link), str(link), *(str(arg) for arg in link.args)):
                if len(text) >= 4:
                    texts.setdefault(text, label)
    return sorted(texts.items(), key=lambda item: -len(item[0]))


def _exceptions_in(args: Any) -> list[BaseException]:
    """Exceptions passed as logging arguments (``log.error("failed: %s", exc)``)."""
    values = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else ()
    return [value for value in values if isinstance(value, BaseException)]


def _redact(value: Any, texts: list[tuple[str, str]], depth: int = 0) -> Any:
    """``value`` with exception objects named by type and exception texts cut out of strings."""
    if isinstance(value, BaseException):
        return f"<{_type_name(value)}>"
    if isinstance(value, str):
        for text, label in texts:
            if text in value:
                value = value.replace(text, label)
        return value
    if depth > 3:
        return value
    if type(value) is dict:  # exact types only: rebuilding a subclass (a namedtuple ...) could fail
        return {key: _redact(item, texts, depth + 1) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_redact(item, texts, depth + 1) for item in value)
    return value


def scrub(record: logging.LogRecord) -> logging.LogRecord:
    """Make a record safe in place (message, arguments, exception); see the module docstring."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(record.msg, BaseException):
        exc = exc or record.msg
    texts = _exception_texts(exc, *_exceptions_in(record.args))
    setattr(record, _EXC_TEXTS, texts)
    if exc is not None:
        record.exc_text = safe_traceback(exc)
        record.exc_info = None
    if record.name.split(".", 1)[0] in WITHHELD_LOGGERS:
        record.msg, record.args = WITHHELD, None
        return record
    if record.name == "py.warnings" and record.msg != WARNING_WITHHELD:  # logging.captureWarnings (Celery)
        first = record.args[0] if isinstance(record.args, tuple) and record.args else record.msg
        where = _WARNING_PREFIX.match(str(first))
        record.msg, record.args = WARNING_WITHHELD, None
        if where:
            record.where, record.category = where.group("where"), where.group("category")
        return record
    if texts:  # the formatted line, with every exception text cut out (whatever type carried it)
        record.msg, record.args = _redact(record.getMessage(), texts), None
    return record


def _scrubbing_factory(base: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            return scrub(record)
        except Exception:  # noqa: BLE001 - a log call must never raise; keep nothing that could leak
            record.msg, record.args = "message withheld (scrub failed)", None
            record.exc_info, record.exc_text = None, None
            setattr(record, _EXC_TEXTS, [])
            return record

    factory._radialog = True  # type: ignore[attr-defined]  # our mark on a function object
    return factory


class PHIFilter(logging.Filter):
    """Drops extra keys that name patient data; cuts exception texts out of extra values."""

    def filter(self, record: logging.LogRecord) -> bool:
        texts = getattr(record, _EXC_TEXTS, None)
        if texts is None:  # made before configure() installed the factory
            scrub(record)
            texts = getattr(record, _EXC_TEXTS)
        for key in list(record.__dict__):
            if key.lower() in PHI_KEYS:
                del record.__dict__[key]
            elif texts and key not in _STANDARD and not key.startswith("_"):
                record.__dict__[key] = _redact(record.__dict__[key], texts)
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = safe_traceback(record.exc_info[1]) if record.exc_info[1] else None
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


# -- warnings and uncaught exceptions -----------------------------------------------------------------


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning``: category and location only (warning texts quote values)."""
    logging.getLogger("py.warnings").warning(
        WARNING_WITHHELD, extra={"category": category.__name__, "where": f"{filename}:{lineno}"}
    )


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else None
    logging.getLogger("radialog.uncaught").error(
        "thread ended by an exception",
        extra={"thread_name": name},
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("radialog.uncaught").critical("process ended by an exception", exc_info=(exc_type, exc, tb))


def configure(level: str = "INFO", stream: Any = None) -> None:
    """Install the JSON handler on the root logger and the safety hooks above (idempotent)."""
    if not getattr(logging.getLogRecordFactory(), "_radialog", False):
        logging.setLogRecordFactory(_scrubbing_factory(logging.getLogRecordFactory()))
    warnings.showwarning = _show_warning
    threading.excepthook = _thread_excepthook
    sys.excepthook = _excepthook
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        if getattr(handler, "_radialog", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(PHIFilter())
    handler._radialog = True  # type: ignore[attr-defined]  # our mark on the handler
    root.addHandler(handler)
    # pynetdicom logs dataset contents at DEBUG and highdicom names source UIDs at INFO; SQLAlchemy's
    # engine logs statements with their parameters at INFO (echo): keep them at WARNING.
    for dicom_library in ("pynetdicom", "highdicom", "sqlalchemy"):
        logging.getLogger(dicom_library).setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    for chatty in ("alembic", "httpx", "httpcore"):  # one line per request/migration step is noise
        logging.getLogger(chatty).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


class Throttled:
    """At most one line per message and ``interval`` seconds, with the count of the ones left out.

    For events a peer can cause at will (refused connections): a flood of connections must not become
    a flood of log lines.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, **extra: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(msg)
            if last is not None and now - last < self._interval:
                self._skipped[msg] = self._skipped.get(msg, 0) + 1
                return
            self._last[msg] = now
            skipped = self._skipped.pop(msg, 0)
        if skipped:
            extra["suppressed"] = skipped
        self._logger.log(level, msg, extra=extra)

    def info(self, msg: str, **extra: Any) -> None:
        self.log(logging.INFO, msg, **extra)

    def warning(self, msg: str, **extra: Any) -> None:
        self.log(logging.WARNING, msg, **extra)
