"""Structured JSON logging without patient data.

Use ``log = get_logger(__name__)`` and ``log.info("event name", extra={"study": study_id})``. Only the
registry's numeric ids and short hashes of UIDs go into logs; keys that could carry patient data are
removed by ``PHIFilter`` whatever a caller passes, so a mistake cannot leak a name into a log file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

#: Extra keys that are never written, even if a caller passes them.
PHI_KEYS = frozenset(
    {"patient_name", "patient_id", "patientname", "patientid", "accession", "accession_number",
     "birth_date", "patient_birth_date", "study_description", "referring_physician"}
)
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def uid_ref(uid: str | None) -> str | None:
    """A short, stable, non-reversible reference to a UID for log lines."""
    if not uid:
        return None
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


class PHIFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key in list(record.__dict__):
            if key.lower() in PHI_KEYS:
                del record.__dict__[key]
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
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", stream: Any = None) -> None:
    """Install the JSON handler on the root logger (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        if getattr(handler, "_radialog", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(PHIFilter())
    handler._radialog = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # pynetdicom logs dataset contents at DEBUG and highdicom names source UIDs at INFO: keep both at
    # WARNING so no header value reaches a log.
    for dicom_library in ("pynetdicom", "highdicom"):
        logging.getLogger(dicom_library).setLevel(logging.WARNING)
    # pydicom's invalid-value warnings quote the value itself (a name, an ID): errors only.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    for chatty in ("alembic", "httpx", "httpcore"):  # one line per request/migration step is noise
        logging.getLogger(chatty).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
