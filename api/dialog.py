"""The follow-up dialog: conversations seeded with the current report, turns sent to the workers,
answers relayed from the Redis channel ``radialog.messaging.dialog_channel`` (JSON token/done/error messages).

The channel is subscribed BEFORE the task is sent, so no token can be published before we listen.
The worker stores the answer in the DialogTurn row too, so a client that lost the stream can poll.
With the embedded broker (``radialog run`` without Redis) there is no channel: the relay polls that row
and delivers the stored answer as one ``done`` message (answers are stored, not streamed).
What may be asked, in which phrasing, and how long a conversation may grow come from the configured
backend's :class:`~workers.models.capabilities.Capabilities` (``RADIALOG_MODEL_BACKEND``): a quick action
the model was not trained for is refused (422) before anything is sent.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.problems import Problem
from api.schemas import MAX_QUESTION_CHARS, CorrectionAction, QuickAction, YesNoAction
from api.services import Services
from radialog.logging import get_logger
from radialog.messaging import dialog_channel
from radialog.presence import BrokerUnavailable
from radialog.registry import Conversation, DialogTurn, ErrorKind, Registry, Report, Study, TurnState, utcnow
from workers.models import prompts
from workers.models.capabilities import RADIALOG_V2, Capabilities

log = get_logger(__name__)

#: Llama-2 tokenizers give roughly one token per ~4 characters of English prose (not measured here on
#: radiology text); dividing by 3 errs towards refusing rather than overflowing the context.
CHARS_PER_TOKEN = 3.0
#: A turn still pending after this long is taken as lost (its worker died) and no longer blocks.
PENDING_TURN_GRACE = timedelta(minutes=5)
RETRY_AFTER_S = 30
#: Without Redis, how often the relay reads the turn's row for the stored answer.
POLL_INTERVAL_S = 0.25


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def conversation_tokens(
    conversation: Conversation, seed: Report | None, capabilities: Capabilities = RADIALOG_V2
) -> int:
    """Estimated prompt size of the whole conversation so far (system, image, seed turn, answered
    turns); past the model's limit the worker drops the oldest follow-up turns."""
    total = estimate_tokens(capabilities.system_text) + capabilities.image_tokens
    if seed is not None:
        total += estimate_tokens(capabilities.seed_question(seed.findings)) + estimate_tokens(seed.findings_text)
    for turn in conversation.turns:
        if turn.state == TurnState.DONE.value:
            total += estimate_tokens(turn.question) + estimate_tokens(turn.answer or "") + 8
    return total


def current_conversation(session: Session, study: Study, user: str, report: Report) -> Conversation:
    """The user's conversation about ``study`` seeded with ``report``; a new version starts a new one
    (the model must see the report the radiologist is now looking at)."""
    conversation = session.scalar(
        select(Conversation)
        .where(Conversation.study_id == study.id, Conversation.user == user, Conversation.seed_report_id == report.id)
        .order_by(Conversation.id.desc())
        .limit(1)
    )
    if conversation is None:
        conversation = Conversation(study_id=study.id, user=user, seed_report_id=report.id, created_at=utcnow())
        session.add(conversation)
        session.flush()
    return conversation


def check_task(task: str, capabilities: Capabilities) -> None:
    """422 for a dialog task the configured model was not trained for (free questions always pass)."""
    if not capabilities.supports(task):
        raise Problem(
            422,
            "task-not-supported",
            f"{capabilities.model_name} was not trained for the '{task}' action; ask a free question",
        )


def action_question(action: QuickAction, capabilities: Capabilities = RADIALOG_V2) -> tuple[str, str]:
    """(task, exact prompt) for a quick action, in the phrasing the model was instruction-tuned on."""
    check_task(action.action, capabilities)
    if isinstance(action, CorrectionAction):
        try:
            return "correction", prompts.correction_prompt(action.add, action.remove)
        except ValueError as exc:  # the schema already refuses this; kept for callers that bypass it
            raise Problem(422, "empty-correction", str(exc)) from exc
    if isinstance(action, YesNoAction):
        return "yes_no", prompts.yes_no_prompt(action.finding)
    # the fixed prompts (RaDialog's view question is asked as a first turn, with the image: the worker
    # asks it with no history)
    return action.action, capabilities.tasks[action.action]


def check_question(question: str) -> None:
    if len(question) > MAX_QUESTION_CHARS:
        raise Problem(413, "question-too-long", f"a question may have at most {MAX_QUESTION_CHARS} characters")


def check_context(seed: Report, question: str, task: str, capabilities: Capabilities = RADIALOG_V2) -> None:
    """Refuse what the worker would refuse: even with only the report turn kept, the prompt and the
    task's new tokens do not fit. (Longer conversations are fine: the worker drops the oldest
    follow-up turns first, ``workers.models.conversation.fit_history``.)"""
    needed = (
        estimate_tokens(capabilities.system_text)
        + capabilities.image_tokens
        + estimate_tokens(capabilities.seed_question(seed.findings))
        + estimate_tokens(seed.findings_text)
        + estimate_tokens(question)
        + capabilities.task_max_new_tokens[task]
    )
    if needed > capabilities.context_tokens:
        raise Problem(
            422,
            "context-too-long",
            f"the report and the question need about {needed} tokens with the answer, over the model's "
            f"{capabilities.context_tokens}; shorten the report or the question",
        )


def check_no_pending_turn(conversation: Conversation) -> None:
    cutoff = utcnow() - PENDING_TURN_GRACE
    for turn in conversation.turns:
        if turn.state in (TurnState.QUEUED.value, TurnState.RUNNING.value) and turn.created_at > cutoff:
            raise Problem(409, "turn-in-progress", f"turn {turn.id} is not answered yet; wait for it")


def require_worker(services: Services) -> None:
    try:
        workers = services.ready_workers()
    except BrokerUnavailable as exc:
        raise Problem(
            503, "broker-unavailable", "the broker cannot be reached", headers={"Retry-After": str(RETRY_AFTER_S)}
        ) from exc
    if not workers:
        raise Problem(
            503, "no-worker", "no worker with a loaded model is running", headers={"Retry-After": str(RETRY_AFTER_S)}
        )


@dataclass
class PendingTurn:
    """A sent turn whose answer is still to come, with the subscription that will deliver it (Redis), or
    the registry whose row will hold it (embedded broker: ``pubsub`` is None)."""

    turn_id: int
    conversation_id: int
    question: str
    pubsub: Any
    registry: Registry | None = None

    def messages(self, timeout: float) -> Iterator[dict[str, Any] | None]:
        """Yield parsed messages; ``None`` about once a second while nothing arrives (for keep-alives
        and deadline checks); stops after done/error or at ``timeout``."""
        if self.pubsub is None:
            yield from self._stored(timeout)
            return
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                raw = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=min(1.0, left))
                if raw is None:
                    yield None
                    continue
                try:
                    message = json.loads(raw["data"])
                except (TypeError, ValueError):
                    continue
                yield message
                if message.get("type") in ("done", "error"):
                    return
        finally:
            self.close()

    def _stored(self, timeout: float) -> Iterator[dict[str, Any] | None]:
        """The answer as the worker stored it: the row read every POLL_INTERVAL_S until DONE or FAILED."""
        assert self.registry is not None
        deadline = time.monotonic() + timeout
        last_idle = time.monotonic()
        while True:
            with self.registry.session() as session:
                turn = session.get(DialogTurn, self.turn_id)
                state: str = turn.state if turn else TurnState.FAILED.value
                answer, error = (turn.answer, turn.error) if turn else (None, "turn gone")
                kind = turn.error_kind if turn else ErrorKind.MODEL_ERROR.value
            if state == TurnState.DONE.value:
                yield {"type": "done", "answer": answer or ""}
                return
            if state == TurnState.FAILED.value:
                yield {"type": "error", "error": error or "error", "kind": kind}
                return
            now = time.monotonic()
            if now >= deadline:
                return
            if now - last_idle >= 1.0:
                last_idle = now
                yield None
            time.sleep(min(POLL_INTERVAL_S, deadline - now))

    def close(self) -> None:
        if self.pubsub is None:
            return
        try:
            self.pubsub.close()
        except redis.RedisError:
            pass


def send_turn(
    session: Session, services: Services, conversation_id: int, task: str, question: str, registry: Registry
) -> PendingTurn:
    """Create the turn (one commit, with whatever the caller added, e.g. its audit entry), subscribe
    to its channel (Redis only), then send the "radialog.dialog_turn" task under the id stored in the row."""
    task_id = str(uuid.uuid4())
    turn = DialogTurn(
        conversation_id=conversation_id,
        task=task,
        question=question,
        state=TurnState.QUEUED.value,
        celery_task_id=task_id,
        created_at=utcnow(),
    )
    session.add(turn)
    session.commit()
    pubsub = None
    try:
        if services.redis_url is not None:
            pubsub = services.redis.pubsub()
            pubsub.subscribe(dialog_channel(services.settings.broker_url, turn.id))
        services.send_dialog_turn(turn.id, task_id)
    except Exception as exc:
        if pubsub is not None:
            pubsub.close()
        turn.state, turn.error = TurnState.FAILED.value, "the task could not be sent to the broker"
        turn.error_kind = ErrorKind.BROKER_UNAVAILABLE.value
        session.commit()
        log.exception("dialog task not sent", extra={"turn": turn.id})
        raise Problem(
            503, "broker-unavailable", "the dialog task could not be sent", headers={"Retry-After": str(RETRY_AFTER_S)}
        ) from exc
    log.info("dialog turn sent", extra={"turn": turn.id, "task": task})
    return PendingTurn(
        turn_id=turn.id, conversation_id=conversation_id, question=question, pubsub=pubsub, registry=registry
    )


def error_status(kind: str | None, error: str) -> int:
    """The HTTP status of a failed turn, from its ``ErrorKind`` (stored with the turn, sent with its error
    message): 422 when the conversation does not fit the model's context, 502 for every other failure.

    ``kind`` is None only for a turn failed by a worker older than the ``error_kind`` column (revision 0005:
    a rolling upgrade, or a message from such a worker); for those alone the old rule on the message's words
    decides, so that they are answered as before (``_legacy_context_error``).
    """
    if kind is None:
        return 422 if _legacy_context_error(error) else 502
    return 422 if kind == ErrorKind.CONTEXT_TOO_LONG.value else 502


def _legacy_context_error(error: str) -> bool:
    """LEGACY, for turns without an error kind only (see ``error_status``): the ContextTooLong message of
    workers before revision 0005 ("... needs N tokens ... but the limit is L ...")."""
    return "ContextTooLong" in error or ("tokens" in error and "limit is" in error)


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def stream_events(pending: PendingTurn, timeout: float) -> Iterator[str]:
    """Server-Sent Events: ``turn`` first, then ``token``s in the order published, then ``done``
    or ``error``; comment lines keep idle proxies from closing the stream."""
    yield sse(
        "turn", {"turn_id": pending.turn_id, "conversation_id": pending.conversation_id, "question": pending.question}
    )
    idle = 0
    for message in pending.messages(timeout):
        if message is None:
            idle += 1
            if idle % 10 == 0:
                yield ": keep-alive\n\n"
            continue
        kind = message.get("type")
        if kind == "token":
            yield sse("token", {"text": str(message.get("text", ""))})
        elif kind == "done":
            yield sse("done", {"turn_id": pending.turn_id, "answer": str(message.get("answer", ""))})
            return
        elif kind == "error":
            error = str(message.get("error", "error"))
            yield sse(
                "error",
                {"turn_id": pending.turn_id, "error": error, "status": error_status(message.get("kind"), error)},
            )
            return
    yield sse("error", {"turn_id": pending.turn_id, "error": "no answer in time; poll the turn", "status": 504})
