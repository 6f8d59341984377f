"""The worker side of a dialog turn: history from the registry, tokens streamed to Redis, answer stored.

History: the seed report as the first exchange (the backend's report question, for RaDialog the v2 report
prompt with the seed report's present classifier labels, answered by its findings text), then the
conversation's earlier DONE turns in order.
Streaming: JSON messages on ``radialog.messaging.dialog_channel`` (``radialog:<broker db>:dialog:<turn_id>``):
{"type": "token", "text"}, then
{"type": "done", "answer"} or {"type": "error", "error", "kind"} (``kind``: the turn's ``ErrorKind``, what the
API's status depends on). With an embedded (non-Redis) broker nothing is
streamed; the API reads the stored answer. A redelivered DONE turn only repeats its "done" message.
Tokens and the answer are cleaned with ``reporting.text`` (the model boundary): an answer accepted as
the report is valid SR text and passes the API's check as shown.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import redis

from radialog.logging import get_logger
from radialog.messaging import dialog_channel
from radialog.registry import Conversation, DialogTurn, ErrorKind, Report, TurnState, utcnow
from radialog.registry.queries import latest_report
from reporting.text import clean_model_text, clean_text
from workers import metrics
from workers.pipeline import JobFailure, is_out_of_memory, load_image

if TYPE_CHECKING:
    from workers.context import WorkerContext
    from workers.models.base import Turn
    from workers.models.capabilities import Capabilities

log = get_logger(__name__)


class Publisher:
    """Publishes one turn's messages; a Redis failure is logged once and never fails the turn."""

    def __init__(self, client: redis.Redis | None, broker_url: str, turn_id: int) -> None:
        self.client = client
        self.channel = dialog_channel(broker_url, turn_id)
        self._broken = False

    def send(self, message: dict[str, Any]) -> None:
        if self.client is None or self._broken:
            return
        try:
            self.client.publish(self.channel, json.dumps(message))
        except redis.RedisError:
            self._broken = True
            log.warning("dialog stream lost: Redis unavailable", extra={"channel": self.channel})


def seed_report(session: Any, conversation: Conversation) -> Report | None:
    if conversation.seed_report_id is not None:
        return session.get(Report, conversation.seed_report_id)
    return latest_report(session, conversation.study_id)


def build_history(session: Any, turn: DialogTurn, capabilities: Capabilities | None = None) -> list[Turn]:
    """The exchanges before ``turn``: seed report first, then earlier answered turns.

    A first-turn task is the exception: RaDialog was trained to answer the view question as the first turn,
    with the image in the question itself, so it is asked with no history at all. ``capabilities``: the
    serving backend's (default RaDialog v2's); its report question opens the history.
    """
    from workers.models.base import Turn
    from workers.models.capabilities import RADIALOG_V2

    capabilities = capabilities or RADIALOG_V2
    if turn.task in capabilities.first_turn_tasks:
        return []
    conversation = turn.conversation
    report = seed_report(session, conversation)
    if report is None:
        raise JobFailure("the study has no report to talk about yet")
    history = [Turn(question=capabilities.seed_question(report.findings), answer=report.findings_text)]
    for earlier in conversation.turns:
        # a first-turn (view) turn was its own one-turn conversation (it holds the image): not part of this one
        if (
            earlier.id < turn.id
            and earlier.state == TurnState.DONE.value
            and earlier.answer is not None
            and earlier.task not in capabilities.first_turn_tasks
        ):
            history.append(Turn(question=earlier.question, answer=earlier.answer))
    return history


def run_dialog_turn(ctx: WorkerContext, turn_id: int) -> str:
    """Answer one turn; the outcome (DONE with the answer, FAILED with a reason) is stored in its row."""
    from workers.models.base import ContextTooLong, DialogRequest, UnsupportedTask

    publisher = Publisher(ctx.redis, ctx.settings.broker_url, turn_id)
    started = time.perf_counter()
    with ctx.registry.session() as session:
        turn = session.get(DialogTurn, turn_id)
        if turn is None:
            log.warning("dialog turn not in the registry", extra={"turn": turn_id})
            return "missing"
        if turn.state == TurnState.DONE.value:
            publisher.send({"type": "done", "answer": turn.answer})
            return "done"
        if turn.state == TurnState.FAILED.value:
            publisher.send({"type": "error", "error": turn.error, "kind": turn.error_kind})
            return "failed"
        turn.state = TurnState.RUNNING.value
        study_id = turn.conversation.study_id
        question, task = turn.question, turn.task
        failure = ""
        try:
            history = build_history(session, turn, ctx.backend.capabilities if ctx.backend else None)
        except JobFailure as exc:
            history, failure = None, str(exc)
    try:
        if history is None:
            raise JobFailure(failure)
        image = load_image(ctx.registry, ctx.settings, study_id)
        first_token: list[float] = []

        def on_token(text: str) -> None:
            if not first_token:
                first_token.append(time.perf_counter() - started)
            # cleaning is per character, so cleaned pieces join up to the cleaned answer (cut aside)
            publisher.send({"type": "token", "text": clean_text(text)})

        request = DialogRequest(image=image, history=history, question=question, task=task)
        # the model boundary: the answer is stored, shown and possibly made a report version as cleaned
        answer = clean_model_text(ctx.require_backend().answer(request, on_token=on_token))
    except (JobFailure, ContextTooLong, UnsupportedTask) as exc:
        return _fail(ctx, publisher, turn_id, str(exc), error_kind(exc))
    except Exception as exc:  # the turn fails, the worker keeps serving
        log.warning("dialog turn failed", extra={"turn": turn_id}, exc_info=True)
        kind = error_kind(exc)
        what = "out of GPU memory" if kind is ErrorKind.OUT_OF_MEMORY else f"model error: {type(exc).__name__}"
        return _fail(ctx, publisher, turn_id, f"{what}; please ask again", kind)
    with ctx.registry.session() as session:
        turn = session.get(DialogTurn, turn_id)
        assert turn is not None
        turn.answer, turn.state, turn.answered_at = answer, TurnState.DONE.value, utcnow()
        turn.error, turn.error_kind = None, None
    publisher.send({"type": "done", "answer": answer})
    if first_token:
        metrics.DIALOG_SECONDS.labels(phase="first").observe(first_token[0])
    metrics.DIALOG_SECONDS.labels(phase="total").observe(time.perf_counter() - started)
    log.info("dialog turn answered", extra={"turn": turn_id})
    return "done"


def error_kind(exc: BaseException) -> ErrorKind:
    """Why a turn failed, by the exception's type (the API's 422 or 502 follows from it, not from the words)."""
    from workers.models.base import ContextTooLong, RequestCancelled, UnsupportedTask

    if isinstance(exc, JobFailure):
        return ErrorKind.NO_INPUT
    if isinstance(exc, ContextTooLong):
        return ErrorKind.CONTEXT_TOO_LONG
    if isinstance(exc, UnsupportedTask):
        return ErrorKind.UNSUPPORTED_TASK
    if isinstance(exc, RequestCancelled):
        return ErrorKind.CANCELLED
    if is_out_of_memory(exc):
        return ErrorKind.OUT_OF_MEMORY
    return ErrorKind.MODEL_ERROR


def _fail(ctx: WorkerContext, publisher: Publisher, turn_id: int, reason: str, kind: ErrorKind) -> str:
    with ctx.registry.session() as session:
        turn = session.get(DialogTurn, turn_id)
        if turn is not None:
            turn.state, turn.answered_at = TurnState.FAILED.value, utcnow()
            turn.error, turn.error_kind = reason, kind.value
    publisher.send({"type": "error", "error": reason, "kind": kind.value})
    return "failed"
