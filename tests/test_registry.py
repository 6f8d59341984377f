"""The registry on SQLite and PostgreSQL: migrations, models and the study state machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from radialog.registry import Base, Instance, Registry, Study, StudyEvent, StudyState, transition, utcnow
from radialog.registry.states import ALLOWED, sources_of


def _study(session, uid: str = "1.2.3.4") -> Study:
    now = utcnow()
    study = Study(study_instance_uid=uid, state=StudyState.RECEIVING.value, created_at=now, updated_at=now)
    session.add(study)
    session.flush()
    return study


def test_migrations_match_models(registry: Registry) -> None:
    with registry.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"


def test_migrate_twice_is_harmless(registry: Registry) -> None:
    registry.migrate()
    registry.ping()


def test_sqlite_runs_in_wal_mode(sqlite_registry: Registry) -> None:
    with sqlite_registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_state_machine_path_and_history(registry: Registry) -> None:
    with registry.session() as s:
        sid = _study(s).id
    path = [StudyState.STABLE, StudyState.QUEUED, StudyState.RUNNING, StudyState.REPORTED, StudyState.EXPORTED]
    for state in path:
        with registry.session() as s:
            assert transition(s, sid, state, reason=f"to {state.value}")
    with registry.session() as s:
        study = s.get(Study, sid)
        assert study.state == "EXPORTED"
        events = s.scalars(select(StudyEvent).where(StudyEvent.study_id == sid).order_by(StudyEvent.id)).all()
        assert [e.to_state for e in events] == [p.value for p in path]
        assert events[0].from_state == "RECEIVING"


def test_transition_is_idempotent_and_refuses_illegal_moves(registry: Registry) -> None:
    with registry.session() as s:
        sid = _study(s).id
        assert not transition(s, sid, StudyState.REPORTED)  # RECEIVING -> REPORTED is not a move
        assert transition(s, sid, StudyState.STABLE)
        assert not transition(s, sid, StudyState.STABLE)  # repeat: no second event
        assert len(s.get(Study, sid).events) == 1


def test_only_from_narrows_sources(registry: Registry) -> None:
    with registry.session() as s:
        sid = _study(s).id
        transition(s, sid, StudyState.STABLE)
        transition(s, sid, StudyState.QUEUED)
        # the reconciler re-queues RUNNING only: a QUEUED study is left alone
        assert not transition(s, sid, StudyState.QUEUED, only_from=[StudyState.RUNNING])


def test_every_state_has_a_way_on() -> None:
    for state in StudyState:
        assert state in ALLOWED
    assert sources_of(StudyState.RECEIVING) == {StudyState.STABLE, StudyState.SKIPPED}


def test_duplicate_sop_instance_uid_is_refused_by_the_database(registry: Registry) -> None:
    with registry.session() as s:
        sid = _study(s).id
        row = dict(
            study_id=sid,
            sop_instance_uid="1.2.3.4.5",
            sop_class_uid="1.2",
            transfer_syntax_uid="1.2.840.10008.1.2",
            path="x",
            size_bytes=1,
            received_at=utcnow(),
            attributes={},
        )
        s.add(Instance(**row))
    with pytest.raises(IntegrityError):
        with registry.session() as s:
            s.add(Instance(**row))


def test_timestamps_come_back_aware_utc_whatever_was_written(registry: Registry) -> None:
    """UTCDateTime: SQLite keeps no offset (it handed datetimes back naive, and stored an aware non-UTC value
    as its wall-clock time); every value now comes back as the same instant, aware, in UTC, on both databases,
    read by the ORM, as a column of a query or through an aggregate, and compared in a WHERE clause."""
    from datetime import UTC, datetime, timedelta, timezone

    from sqlalchemy import func

    paris = datetime(2026, 3, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))  # 12:30 UTC
    naive = datetime(2026, 3, 1, 12, 0)  # the registry's convention: a naive value is UTC
    with registry.session() as s:
        sid = _study(s).id
        s.get(Study, sid).last_instance_at = paris
        s.add(StudyEvent(study_id=sid, from_state=None, to_state="RECEIVING", at=naive))
    with registry.session() as s:
        study = s.get(Study, sid)
        assert study.last_instance_at == paris and study.last_instance_at.tzinfo is UTC
        assert study.last_instance_at.isoformat() == "2026-03-01T12:30:00+00:00"
        assert study.created_at.tzinfo is UTC and study.events[0].at == naive.replace(tzinfo=UTC)
        assert study.events[0].at.tzinfo is UTC
        assert s.scalar(select(Study.last_instance_at).where(Study.id == sid)).tzinfo is UTC
        assert s.scalar(select(func.min(StudyEvent.at))).tzinfo is UTC
        # the bound is converted too: 12:15 UTC written as 14:15+02:00 is before 12:30 UTC
        later = datetime(2026, 3, 1, 14, 15, tzinfo=timezone(timedelta(hours=2)))
        assert s.scalar(select(Study.id).where(Study.last_instance_at > later)) == sid


@pytest.fixture(params=["sqlite", "postgresql"])
def bare_registry(request: pytest.FixtureRequest, tmp_path) -> Iterator[Registry]:  # type: ignore[no-untyped-def]
    """An empty database (no migration run yet), on SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        reg = Registry(f"sqlite:///{tmp_path / 'bare.db'}")
        yield reg
        reg.dispose()
    else:
        from radialog.registry.db import temporary_schema
        from tests.conftest import PG_URL

        with temporary_schema(PG_URL, prefix="t") as url:
            reg = Registry(url)
            yield reg
            reg.dispose()


def _downgrade(registry: Registry, revision: str) -> None:
    from alembic import command

    from radialog.registry.migrate import alembic_config

    with registry.engine.begin() as conn:
        config = alembic_config(registry.engine)
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def _turn_columns(registry: Registry) -> set[str]:
    from sqlalchemy import inspect

    with registry.engine.connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns("dialog_turns")}


def test_error_kind_migration_keeps_turns_up_down_and_up_again(bare_registry: Registry) -> None:
    """0005 adds the nullable ``dialog_turns.error_kind`` to a database with turns (they keep NULL: the API
    answers them by the legacy rule), drops it again on the way down, and can be applied once more."""
    from sqlalchemy import text

    from radialog.registry import DialogTurn
    from radialog.registry.migrate import upgrade

    upgrade(bare_registry.engine, "0004")
    assert "error_kind" not in _turn_columns(bare_registry)
    with bare_registry.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, state, created_at, updated_at) "
                "VALUES (1, '1.2.3', 'REPORTED', :now, :now)"
            ),
            {"now": utcnow()},
        )
        conn.execute(
            text("INSERT INTO conversations (id, study_id, \"user\", created_at) VALUES (1, 1, 'rad', :now)"),
            {"now": utcnow()},
        )
        conn.execute(
            text(
                "INSERT INTO dialog_turns (id, conversation_id, task, question, state, error, created_at) "
                "VALUES (7, 1, 'free', 'Any edema?', 'FAILED', 'too long: needs 9000 tokens but the limit "
                "is 4096', :now)"
            ),
            {"now": utcnow()},
        )
    upgrade(bare_registry.engine)
    with bare_registry.session() as s:
        turn = s.get(DialogTurn, 7)
        assert (turn.state, turn.error_kind) == ("FAILED", None) and "limit is 4096" in (turn.error or "")
        turn.error_kind = "MODEL_ERROR"
    _downgrade(bare_registry, "0004")
    assert "error_kind" not in _turn_columns(bare_registry)
    with bare_registry.engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM dialog_turns WHERE id = 7")).scalar() == "FAILED"
    upgrade(bare_registry.engine)
    with bare_registry.session() as s:
        assert s.get(DialogTurn, 7).error_kind is None  # the value went with the column
    with bare_registry.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff
