"""Dialog: the caller's conversation about a study, free questions and quick actions, answered as
one JSON body (waiting up to ``wait_seconds``) or streamed as Server-Sent Events; and what the configured
model can do (``GET /model``), so that the page offers only the actions it was trained for."""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session

from api import audit
from api.deps import DB, AnyUser, AppRegistry, AppServices, AppSettings
from api.deps_types import Principal
from api.dialog import (
    PendingTurn,
    action_question,
    check_context,
    check_no_pending_turn,
    check_question,
    check_task,
    conversation_tokens,
    current_conversation,
    error_status,
    require_worker,
    send_turn,
    stream_events,
)
from api.lookups import get_study, require_report
from api.problems import Problem, problem_responses
from api.schemas import ConversationOut, ModelOut, Question, QuickAction, StudyId, TurnId, TurnOut
from api.services import Services
from radialog.registry import DialogTurn, Registry, TurnState
from workers.models.capabilities import Capabilities, UnknownBackend, capabilities_for

router = APIRouter(tags=["dialog"])
_ERRORS = problem_responses(401, 403, 404, 409, 413, 422, 502, 503, 504)
_ANSWER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The answered turn (JSON), or with stream=true a text/event-stream of events "
        "turn, token (in generation order), then done or error",
        # one schema per event (as OpenAPI 3.2's itemSchema): its name and its JSON data
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["turn", "token", "done", "error"]},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                }
            }
        },
    },
    202: {"description": "Not answered within wait_seconds; poll GET /api/v1/dialog/turns/{turn_id}", "model": TurnOut},
    **_ERRORS,
}
STREAM_TIMEOUT_S = 300.0


def model_capabilities(settings: AppSettings) -> Capabilities:
    """The configured backend's capabilities (RADIALOG_MODEL_BACKEND, shared with the workers)."""
    try:
        return capabilities_for(settings.model_backend)
    except UnknownBackend as exc:
        raise Problem(503, "model-backend-unknown", str(exc)) from exc


ModelCapabilities = Annotated[Capabilities, Depends(model_capabilities)]


@router.get("/model", response_model=ModelOut, responses=problem_responses(401, 403, 503))
def read_model(who: AnyUser, capabilities: ModelCapabilities) -> ModelOut:
    """What the configured model can do: a findings classifier or not, the dialog tasks it was trained for
    (with the exact prompt sent, null when built from the request) and its context length."""
    return ModelOut.model_validate(capabilities.to_dict())


def _conversation_out(conversation: Any, seed: Any, capabilities: Capabilities) -> ConversationOut:
    return ConversationOut(
        id=conversation.id,
        study_id=conversation.study_id,
        user=conversation.user,
        seed_report_id=conversation.seed_report_id,
        seed_report_version=seed.version if seed else None,
        created_at=conversation.created_at,
        turns=[TurnOut.model_validate(t) for t in conversation.turns],
        estimated_tokens=conversation_tokens(conversation, seed, capabilities),
        max_context_tokens=capabilities.context_tokens,
    )


@router.get("/studies/{study_id}/dialog", response_model=ConversationOut, responses=_ERRORS)
def read_conversation(study_id: StudyId, session: DB, who: AnyUser, capabilities: ModelCapabilities) -> ConversationOut:
    """The caller's conversation about the study's current report (created empty when new)."""
    study = get_study(session, study_id)
    report = require_report(session, study)
    conversation = current_conversation(session, study, who.name, report)
    audit.record(session, who, "dialog.read", study_id, conversation=conversation.id)
    session.commit()
    return _conversation_out(conversation, report, capabilities)


def _ask(
    study_id: StudyId,
    task: str,
    question: str,
    stream: bool,
    wait_seconds: float,
    session: Session,
    who: Principal,
    registry: Registry,
    services: Services,
    capabilities: Capabilities,
) -> Any:
    check_question(question)
    check_task(task, capabilities)
    study = get_study(session, study_id)
    report = require_report(session, study)
    conversation = current_conversation(session, study, who.name, report)
    check_no_pending_turn(conversation)
    check_context(report, question, task, capabilities)
    require_worker(services)
    audit.record(session, who, "dialog.ask", study_id, conversation=conversation.id, task=task)
    pending = send_turn(session, services, conversation.id, task, question, registry)
    if stream:
        return StreamingResponse(
            stream_events(pending, STREAM_TIMEOUT_S),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
    return _wait(pending, wait_seconds, registry)


#: A non-streamed answer is awaited in one of the API's worker threads (anyio's pool, 40): at most this
#: many at once, so clients waiting for answers cannot starve every other request. Beyond it the turn is
#: answered at once (202 + Location to poll, or the answer if it is already there).
MAX_BLOCKING_WAITS = 16
_blocking_waits = threading.BoundedSemaphore(MAX_BLOCKING_WAITS)


def _wait(pending: PendingTurn, wait_seconds: float, registry: Registry) -> Any:
    """The answered turn; the row (written by the worker) wins over the channel's message."""
    final: dict[str, Any] | None = None
    waiting = _blocking_waits.acquire(blocking=False)
    try:
        for message in pending.messages(wait_seconds if waiting else 0.0):
            if message is not None and message.get("type") in ("done", "error"):
                final = message
    finally:
        if waiting:
            _blocking_waits.release()
    with registry.session() as session:
        row = session.get(DialogTurn, pending.turn_id)
        turn = TurnOut.model_validate(row)
        kind = row.error_kind if row is not None else None
    if turn.state == TurnState.DONE.value:
        return turn
    error = turn.error if turn.state == TurnState.FAILED.value else None
    if error is None and final is not None:
        if final["type"] == "done":  # published around the worker's commit: trust the message
            return turn.model_copy(update={"state": TurnState.DONE.value, "answer": str(final.get("answer", ""))})
        error, kind = str(final.get("error", "error")), final.get("kind")
    if error is None:
        return JSONResponse(
            turn.model_dump(mode="json"),
            status_code=202,
            headers={"Location": f"/api/v1/dialog/turns/{pending.turn_id}"},
        )
    if error_status(kind, error) == 422:
        raise Problem(422, "context-too-long", error)
    raise Problem(502, "model-error", f"the worker could not answer turn {pending.turn_id}: {error}")


@router.post("/studies/{study_id}/dialog/questions", response_model=TurnOut, responses=_ANSWER_RESPONSES)
def ask_question(
    study_id: StudyId,
    body: Question,
    session: DB,
    who: AnyUser,
    registry: AppRegistry,
    services: AppServices,
    capabilities: ModelCapabilities,
) -> Any:
    """Ask a free question about the study (the model sees the image, its report and the turns so far)."""
    return _ask(
        study_id, "free", body.question, body.stream, body.wait_seconds, session, who, registry, services, capabilities
    )


@router.post("/studies/{study_id}/dialog/actions", response_model=TurnOut, responses=_ANSWER_RESPONSES)
def quick_action(
    study_id: StudyId,
    body: QuickAction,
    session: DB,
    who: AnyUser,
    registry: AppRegistry,
    services: AppServices,
    capabilities: ModelCapabilities,
) -> Any:
    """A quick action (RaDialog: correction, yes/no, list, impression, easy language, summary, view; XrayGPT:
    list, impression) sent with the exact phrasing the model was trained on; others are refused with 422
    (``GET /model`` lists them)."""
    task, question = action_question(body, capabilities)
    return _ask(
        study_id, task, question, body.stream, body.wait_seconds, session, who, registry, services, capabilities
    )


@router.get("/dialog/turns/{turn_id}", response_model=TurnOut, responses=problem_responses(401, 403, 404, 422))
def read_turn(turn_id: TurnId, session: DB, who: AnyUser) -> TurnOut:
    """One turn (poll this after a 202 or a lost stream). Only its asker or an admin may read it."""
    turn = session.get(DialogTurn, turn_id)
    if turn is None or (turn.conversation.user != who.name and who.role != "admin"):
        raise Problem(404, "turn-not-found", f"no dialog turn {turn_id} of yours")
    audit.record(session, who, "dialog.read", turn.conversation.study_id, turn=turn_id)
    session.commit()
    return TurnOut.model_validate(turn)
