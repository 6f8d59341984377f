"""The dialog through the whole chain: API -> Redis -> a real ``radialog worker`` process with the tiny
RaDialog checkpoint -> tokens on the Redis channel -> the API's JSON answer or Server-Sent Events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from radialog.registry import AuditEntry, DialogTurn, Registry
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.polling import wait_for
from tests.support.processes import dialog_worker
from tests.support.seeding import add_reported_study, make_keys
from workers.models import prompts

REDIS_URL = redis_url(__name__)


@pytest.fixture
def chain(
    registry: Registry, settings: Settings, tiny_model: tuple[Path, Path], tmp_path: Path
) -> Iterator[tuple[TestClient, dict[str, str], int, Registry]]:
    api_settings = settings.model_copy(
        update={"broker_url": REDIS_URL, "model_dir": tiny_model[0], "base_model_dir": tiny_model[1], "device": "cpu"}
    )
    client = redis.Redis.from_url(REDIS_URL)
    client.delete("dialog", "export")
    worker = dialog_worker(api_settings, registry.url, tmp_path, f"api-test-{uuid.uuid4().hex[:8]}")
    try:
        keys = make_keys(registry)
        study_id = add_reported_study(registry, api_settings)
        worker.wait_ready()
        with TestClient(create_app(api_settings, registry)) as http:
            yield http, keys, study_id, registry
    finally:
        worker.stop()
        client.close()


def settings_of(http: TestClient) -> Settings:
    return http.app.state.settings  # type: ignore[attr-defined]


def sse_events(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith(":")]
        if not lines:
            continue
        event = next(line[6:].strip() for line in lines if line.startswith("event:"))
        data = json.loads("".join(line[5:].strip() for line in lines if line.startswith("data:")))
        events.append((event, data))
    return events


@pytest.mark.slow
def test_dialog_streams_in_order_answers_and_feeds_a_correction(chain) -> None:  # type: ignore[no-untyped-def]
    http, keys, study_id, registry = chain
    h = {"Authorization": f"Bearer {keys['rad']}"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["workers"] == "1 ready"

    # streamed: subscribe, send, relay; tokens arrive in generation order and add up to the answer
    with http.stream(
        "POST",
        f"/api/v1/studies/{study_id}/dialog/questions",
        headers=h,
        json={"question": "Is the heart enlarged?", "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "turn" and kinds[-1] == "done", kinds
    assert set(kinds[1:-1]) <= {"token"} and len(kinds) > 3
    turn_id = events[0][1]["turn_id"]
    answer = events[-1][1]["answer"]
    assert "".join(data["text"] for kind, data in events if kind == "token").strip() == answer.strip()
    with registry.session() as s:
        turn = s.get(DialogTurn, turn_id)
        assert turn.state == "DONE" and turn.answer == answer and turn.question == "Is the heart enlarged?"

    # waited JSON answer for a quick action, with the exact prompt text
    action = http.post(
        f"/api/v1/studies/{study_id}/dialog/actions",
        headers=h,
        json={"action": "correction", "remove": ["Pleural Effusion"], "wait_seconds": 120},
    )
    assert action.status_code == 200, action.text
    correction = action.json()
    assert correction["state"] == "DONE" and correction["task"] == "correction"
    assert correction["question"] == prompts.correction_prompt([], ["Pleural Effusion"])

    # no waiting: 202 with the turn to poll; another user cannot read it
    accepted = http.post(
        f"/api/v1/studies/{study_id}/dialog/actions",
        headers=h,
        json={"action": "yes_no", "finding": "Pneumothorax", "wait_seconds": 0},
    )
    assert accepted.status_code in (200, 202), accepted.text
    polled = accepted.json()
    assert polled["question"] == "Is there any Pneumothorax?"  # the CheXpert label as written, as trained
    if polled["state"] not in ("DONE", "FAILED"):
        polled = wait_for(
            lambda: (
                (turn := http.get(f"/api/v1/dialog/turns/{polled['id']}", headers=h).json())["state"]
                in ("DONE", "FAILED")
                and turn
            ),
            what="the turn settled",
            timeout=120,
            interval=0.2,
        )
    assert polled["state"] == "DONE" and polled["task"] == "yes_no"
    view = http.post(
        f"/api/v1/studies/{study_id}/dialog/actions", headers=h, json={"action": "view", "wait_seconds": 120}
    ).json()
    assert view["state"] == "DONE" and view["question"] == "<image> From what view was this image taken?"
    reader = {"Authorization": f"Bearer {keys['reader']}"}
    assert http.get(f"/api/v1/dialog/turns/{polled['id']}", headers=reader).status_code == 404

    conversation = http.get(f"/api/v1/studies/{study_id}/dialog", headers=h).json()
    assert [t["id"] for t in conversation["turns"]] == [turn_id, correction["id"], polled["id"], view["id"]]

    # "use this as the report": the model's corrected text becomes version 2, then the radiologist signs
    text = correction["answer"].strip() or "No pleural effusion."
    v2 = http.post(
        f"/api/v1/studies/{study_id}/report/versions",
        headers=h,
        json={"kind": "ai_correction", "findings_text": text, "source_turn_id": correction["id"]},
    )
    assert v2.status_code == 201, v2.text
    assert v2.json()["kind"] == "ai_correction" and v2.json()["findings_text"] == text
    v3 = http.post(f"/api/v1/studies/{study_id}/report/approve", headers=h, json={"base_version": 2})
    assert v3.status_code == 201 and v3.json()["verified"] is True
    # a new version seeds a new conversation (the model must see the text now on screen)
    assert http.get(f"/api/v1/studies/{study_id}/dialog", headers=h).json()["turns"] == []

    # a worker failure comes back as a problem (JSON) or an error event (SSE), and the row says FAILED
    broken = add_reported_study(registry, settings_of(http), index=5)
    with registry.session() as s:
        from radialog.registry import Instance, Study

        instance = s.get(Instance, s.get(Study, broken).selected_instance_id)
        (settings_of(http).spool_dir / instance.path).unlink()
    failed = http.post(
        f"/api/v1/studies/{broken}/dialog/questions", headers=h, json={"question": "Any effusion?", "wait_seconds": 120}
    )
    assert failed.status_code == 502 and failed.json()["type"].endswith("/model-error"), failed.text
    with http.stream(
        "POST",
        f"/api/v1/studies/{broken}/dialog/questions",
        headers=h,
        json={"question": "Any effusion now?", "stream": True},
    ) as response:
        events = sse_events(response.read().decode())
    assert [kind for kind, _ in events] == ["turn", "error"] and events[-1][1]["status"] == 502
    with registry.session() as s:
        assert s.get(DialogTurn, events[0][1]["turn_id"]).state == "FAILED"

    with registry.session() as s:
        actions = [e.action for e in s.scalars(select(AuditEntry).where(AuditEntry.study_id == study_id))]
    assert actions.count("dialog.ask") == 4 and "report.change" in actions and "report.approve" in actions


@pytest.mark.parametrize(
    ("error", "kind", "status"),
    [
        # the worker's kind decides, whatever the words say
        ("the prompt needs 5000 tokens but the limit is 4096 in the rotary cache", "MODEL_ERROR", 502),
        ("the conversation no longer fits the model's window", "CONTEXT_TOO_LONG", 422),
        ("not trained for 'summary'", "UNSUPPORTED_TASK", 502),
        # turns failed before revision 0005 (no kind): the legacy rule on the words, as before
        ("conversation needs 9000 tokens with the answer, but the limit is 4096", None, 422),
        ("model error: RuntimeError; please ask again", None, 502),
    ],
)
def test_a_failed_turn_is_answered_by_its_error_kind_not_by_its_words(
    registry: Registry, settings: Settings, error: str, kind: str | None, status: int
) -> None:
    """The JSON answer (a problem) and the SSE error event of a turn the worker failed, read from its row
    (as with the embedded broker, and after the worker's message) on both databases."""
    from api.dialog import PendingTurn, stream_events
    from api.problems import Problem
    from api.routes.dialog import _wait
    from api.schemas import TurnOut
    from radialog.registry import Conversation, utcnow
    from tests.support.seeding import add_reported_study

    study_id = add_reported_study(registry, settings)
    with registry.session() as s:
        conversation = Conversation(study_id=study_id, user="rad", created_at=utcnow())
        s.add(conversation)
        s.flush()
        turn = DialogTurn(
            conversation_id=conversation.id,
            task="free",
            question="Any edema?",
            state="FAILED",
            error=error,
            error_kind=kind,
            created_at=utcnow(),
            answered_at=utcnow(),
        )
        s.add(turn)
        s.flush()
        turn_id, conversation_id = turn.id, conversation.id

    def pending() -> PendingTurn:
        return PendingTurn(turn_id, conversation_id, "Any edema?", pubsub=None, registry=registry)

    with pytest.raises(Problem) as problem:
        _wait(pending(), 5.0, registry)
    slug = "context-too-long" if status == 422 else "model-error"
    assert (problem.value.status, problem.value.slug) == (status, slug)
    assert error in (problem.value.detail or "")
    events = sse_events("".join(stream_events(pending(), 5.0)))
    assert events[-1] == ("error", {"turn_id": turn_id, "error": error, "status": status})
    with registry.session() as s:  # API clients read the kind too (GET /dialog/turns/{id}, conversations)
        assert TurnOut.model_validate(s.get(DialogTurn, turn_id)).error_kind == kind
