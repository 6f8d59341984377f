"""Column types of the registry."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back as an aware UTC datetime, on every database.

    SQLite keeps no offset (it hands datetimes back naive and would store an aware non-UTC value as its
    wall-clock time); PostgreSQL's ``timestamptz`` answers in the session's time zone. Values are converted
    to UTC on the way in (a naive value is taken as UTC, the registry's convention) and marked UTC on the
    way out, so no reader patches naive datetimes. The same goes for values compared with a column in a query.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
