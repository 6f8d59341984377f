"""DICOM UID validation: a UID from the network becomes part of a file path only after this check."""

from __future__ import annotations

import re
from typing import TypeGuard

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class InvalidUID(ValueError):
    pass


def is_valid_uid(value: object) -> TypeGuard[str]:
    """True for a syntactically valid DICOM UID (PS3.5 9.1): digits and dots, <= 64 chars (then a ``str``)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.match(value) is not None


def require_uid(value: object, what: str = "UID") -> str:
    if not is_valid_uid(value):
        raise InvalidUID(f"invalid {what}: {str(value)[:80]!r}")
    return value
