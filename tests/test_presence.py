"""Worker readiness for either broker (``radialog.presence``), and the API on the embedded broker: /readyz
and a dialog question whose answer is read back from the registry (the slow end-to-end run with a real
worker is tests/test_embedded.py)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from composition.run import embedded_broker
from radialog.presence import BrokerUnavailable, FilePresence, RedisPresence, presence_for, ready_key
from radialog.registry import DialogTurn, Registry, utcnow
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.seeding import add_reported_study, make_keys

REDIS_URL = redis_url(__name__)
INFO = {"name": "RaDialog-LLaVA", "version": "2.0-test", "hostname": "w1@test"}


def make_broker_file(path: Path) -> None:
    """An SQLite database where the embedded broker keeps its queues (kombu creates its tables on use)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")


def test_file_presence_announces_expires_and_withdraws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = tmp_path / "broker.sqlite"
    presence = FilePresence(tmp_path / "workers", broker)
    with pytest.raises(BrokerUnavailable):
        presence.ping()  # no broker database yet: never created by a readiness check
    assert not broker.exists()
    make_broker_file(broker)
    presence.ping()
    assert presence.ready() == []
    presence.announce("w1@test", INFO)
    presence.announce("w2/odd@test", INFO)
    assert sorted(w["worker"] for w in presence.ready()) == ["w1@test", "w2_odd@test"]
    assert presence.ready()[0]["version"] == "2.0-test"
    presence.withdraw("w2/odd@test")
    assert [w["worker"] for w in presence.ready()] == ["w1@test"]
    later = time.time() + 31  # past the TTL without a refresh: the worker is taken as gone
    monkeypatch.setattr("radialog.presence.time.time", lambda: later)
    assert presence.ready() == []
    assert (tmp_path / "workers" / "w1@test.json").exists()
    much_later = later + 3600  # an hour past its expiry: removed (each worker start leaves one)
    monkeypatch.setattr("radialog.presence.time.time", lambda: much_later)
    assert presence.ready() == [] and list((tmp_path / "workers").iterdir()) == []


def test_redis_presence_uses_the_keys_compose_and_the_tests_read() -> None:
    assert ready_key("w1@test") == "radialog:worker:w1@test"  # the wire name compose's health check reads
    presence = RedisPresence(REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        presence.announce("w1@test", INFO)
        assert json.loads(client.get(ready_key("w1@test"))) == INFO
        assert 0 < client.ttl(ready_key("w1@test")) <= 30
        assert {"worker": "w1@test", **INFO} in presence.ready()
        presence.withdraw("w1@test")
        assert not client.exists(ready_key("w1@test"))
    finally:
        client.delete(ready_key("w1@test"))
        client.close()
        presence.close()
    with pytest.raises(BrokerUnavailable):
        RedisPresence("redis://127.0.0.1:1/0").ping()


@pytest.fixture
def embedded(settings: Settings) -> Settings:
    """The settings `radialog run` uses without Redis (kombu's SQLite transport under the data dir)."""
    return embedded_broker(settings)


@pytest.fixture
def client(embedded: Settings, sqlite_registry: Registry) -> Iterator[TestClient]:
    with TestClient(create_app(embedded, sqlite_registry)) as c:
        yield c


def test_readyz_sees_a_worker_on_the_embedded_broker(client: TestClient, embedded: Settings) -> None:
    not_yet = client.get("/readyz")
    assert not_yet.status_code == 503 and not_yet.json()["checks"]["broker"].startswith("unavailable")
    make_broker_file(embedded.data_dir / "broker.sqlite")
    assert client.get("/readyz").json()["checks"] == {"registry": "ok", "broker": "ok", "workers": "none ready"}
    presence_for(embedded).announce("w1@test", INFO)
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert [w["worker"] for w in ready.json()["workers"]] == ["w1@test"]


def test_a_question_on_the_embedded_broker_is_sent_and_its_stored_answer_returned(
    client: TestClient, embedded: Settings, sqlite_registry: Registry
) -> None:
    """The task goes into the embedded broker's queue (kombu, a real SQLite file); the answer the worker
    stores in the turn's row (written here by a thread, as `workers.dialog` does) comes back as JSON."""
    study_id = add_reported_study(sqlite_registry, embedded)
    keys = make_keys(sqlite_registry)
    make_broker_file(embedded.data_dir / "broker.sqlite")
    presence_for(embedded).announce("w1@test", INFO)
    stop = threading.Event()

    def store_answer() -> None:
        while not stop.wait(0.05):
            with sqlite_registry.session() as session:
                turn = session.scalars(select(DialogTurn).where(DialogTurn.state == "QUEUED")).first()
                if turn is not None:
                    turn.state, turn.answer, turn.answered_at = "DONE", "No pleural effusion.", utcnow()
                    return

    answerer = threading.Thread(target=store_answer, daemon=True)
    answerer.start()
    try:
        response = client.post(
            f"/api/v1/studies/{study_id}/dialog/questions",
            headers={"X-API-Key": keys["rad"]},
            json={"question": "Is there a pleural effusion?", "wait_seconds": 60},
        )
    finally:
        stop.set()
        answerer.join(timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "DONE" and response.json()["answer"] == "No pleural effusion."
    with closing(sqlite3.connect(embedded.data_dir / "broker.sqlite")) as conn:  # the task is in the queue
        [(queued,)] = conn.execute("SELECT count(*) FROM kombu_message").fetchall()
    assert queued == 1
