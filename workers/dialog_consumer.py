"""Dialog turns beside the report tasks: a Celery consumer bootstep on the ``dialog`` queue.

Why not a pool thread: with the engine, a worker's pool threads wait on report batches, and a turn that
needed a free pool thread would wait for a batch to end. This consumer (Celery's documented
``bootsteps.ConsumerStep``) takes dialog messages on its own channel of the worker's broker connection and
answers each in its own small thread pool; the engine then serves the turn before any report. Messages
are acknowledged once the turn is stored (DONE or FAILED with a reason), like ``acks_late``; a killed
worker's unacknowledged turn comes back from the broker, and the reconciler fails a turn left RUNNING.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import bootsteps
from kombu import Consumer, Message

from radialog.logging import get_logger
from radialog.messaging import DIALOG_QUEUE, DIALOG_TASK, app_for
from workers import context

log = get_logger(__name__)


def turn_id_of(body: Any, headers: dict[str, Any]) -> int:
    """The turn id of a Celery task message (protocol 2: ``[args, kwargs, embed]``; protocol 1: a dict)."""
    task = headers.get("task") if headers else None
    if isinstance(body, dict):  # protocol 1
        task, args = body.get("task"), body.get("args")
    else:
        args = body[0] if isinstance(body, list | tuple) and body else None
    if task != DIALOG_TASK or not args:
        raise ValueError(f"not a dialog turn message (task {task!r})")
    return int(args[0])


class DialogConsumer(bootsteps.ConsumerStep):
    """Consumes ``dialog`` beside the pool; ``threads`` turns run at once (the engine's dialog slots)."""

    threads = 4

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.executor: ThreadPoolExecutor | None = None

    def get_consumers(self, channel: Any) -> list[Consumer]:
        if self.executor is None:  # kept across broker reconnects (Celery restarts the consumer steps)
            self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="radialog-dialog")
        queue = self.app_queue(channel)
        return [
            Consumer(channel, queues=[queue], callbacks=[self.on_message], accept=["json"], prefetch_count=self.threads)
        ]

    def app_queue(self, channel: Any) -> Any:
        return app_for(context.current().settings).amqp.queues[DIALOG_QUEUE]

    def on_message(self, body: Any, message: Message) -> None:
        try:
            turn_id = turn_id_of(body, message.headers)
        except (ValueError, TypeError, IndexError) as exc:
            log.warning("dialog queue: message dropped", extra={"error": str(exc)})
            message.reject(requeue=False)
            return
        assert self.executor is not None
        self.executor.submit(self._answer, turn_id, message)

    def _answer(self, turn_id: int, message: Message) -> None:
        from workers.dialog import run_dialog_turn

        try:
            run_dialog_turn(context.current(), turn_id)
        except Exception:  # the turn's row says nothing yet: the reconciler fails it if it stays RUNNING
            log.exception("dialog turn crashed", extra={"turn": turn_id})
        finally:
            message.ack()

    def shutdown(self, c: Any) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        super().shutdown(c)
