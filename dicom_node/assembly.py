"""Study assembly: a study that stopped receiving becomes STABLE, gets its image, and is queued.

``StudyAssembler`` runs as a thread in the node process. Each tick it takes RECEIVING studies whose
last instance is older than ``settings.stable_after`` and, in one transaction per study, moves them
RECEIVING -> STABLE -> QUEUED (image chosen, ``Study.selected_instance_id`` set) or -> SKIPPED with a
reason a person can read. The routing rules (``radialog.routing``, ``settings.routing_rules``) then decide
on the chosen image's header, the calling AE and the C-STORE priority: SKIPPED with the rule's reason, or
QUEUED with the rule's priority (``Study.priority``; the decision is kept in ``Study.routing``).

A study sent by a trusted router (``settings.trusted_routers``: it sends whole studies in one association)
is complete when that association is released: ``complete(study_ids)`` hands it to the assembler thread,
which assembles it at once instead of after ``stable_after``. A later instance re-opens it as any late
instance does (while it is STABLE or SKIPPED). The registry is the contract: ``enqueue(study_id)`` is called after the
commit and its errors are only logged, because the workers' reconciler re-sends any QUEUED study
without a live task. A crash mid-way rolls the transaction back, so the study is simply RECEIVING and
overdue at the next start, which is how overdue studies move on after a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.selection import choose_image
from dicom_node.store import db_error_kind
from radialog.logging import get_logger
from radialog.registry import Instance, Registry, Study, StudyState, transition, utcnow
from radialog.routing import Decision, evaluate, facts_of
from radialog.settings import Settings

log = get_logger(__name__)

Enqueue = Callable[[int], object]


class StudyAssembler:
    """Moves quiet RECEIVING studies on; ``tick()`` does one pass, ``start()`` runs it every ``interval``."""

    def __init__(
        self, registry: Registry, settings: Settings, enqueue: Enqueue | None = None, interval: float = 0.5
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.enqueue = enqueue
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._complete: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def complete(self, study_ids: set[int]) -> None:
        """Studies a trusted router finished sending: assembled at the next pass, without the quiet window."""
        if not study_ids:
            return
        with self._lock:
            self._complete |= study_ids
        self._wake.set()

    def _take_complete(self) -> set[int]:
        with self._lock:
            taken, self._complete = self._complete, set()
        return taken

    # -- one pass ---------------------------------------------------------------------------------
    def due_studies(self, now: datetime | None = None) -> list[int]:
        """Ids of RECEIVING studies quiet for ``stable_after`` seconds, and STABLE leftovers."""
        cutoff = (now or utcnow()) - timedelta(seconds=self.settings.stable_after)
        with self.registry.session() as session:
            return list(
                session.scalars(
                    select(Study.id)
                    .where(
                        or_(
                            (Study.state == StudyState.RECEIVING.value)
                            & or_(Study.last_instance_at < cutoff, Study.last_instance_at.is_(None)),
                            Study.state == StudyState.STABLE.value,
                        )
                    )
                    .order_by(Study.last_instance_at)
                )
            )

    def assemble(self, study_id: int, now: datetime | None = None, *, complete: bool = False) -> StudyState | None:
        """Move one study on; returns its new state, or None when it was not (or no longer) due.

        ``complete``: a trusted router released its association, the study is whole now (no quiet window).
        """
        cutoff = (now or utcnow()) - timedelta(seconds=0 if complete else self.settings.stable_after)
        quiet_for = (
            "its trusted router released the association"
            if complete
            else f"no new instance for {self.settings.stable_after:g} s"
        )
        with self.registry.session() as session:
            study = session.get(Study, study_id)
            if study is None:
                return None
            if study.state == StudyState.RECEIVING.value:
                if not transition(session, study_id, StudyState.STABLE, quiet_for):
                    return None
                # transition() re-read the row under the write lock: a store that committed while we
                # looked makes the study not quiet after all.
                last = study.last_instance_at
                if last is not None and last >= cutoff and not complete:
                    session.rollback()
                    return None
            elif study.state != StudyState.STABLE.value:
                return None
            rows = session.execute(
                select(Instance.id, Instance.attributes, Instance.calling_ae_title)
                .where(Instance.study_id == study_id)
                .order_by(Instance.id)
            ).all()
            selection = choose_image((row.id, row.attributes) for row in rows)
            target = StudyState.QUEUED if selection.instance_id is not None else StudyState.SKIPPED
            reason = selection.reason
            values: dict[str, Any] = {"selected_instance_id": selection.instance_id}
            decision: Decision | None = None
            if selection.instance_id is not None:
                chosen = next(row for row in rows if row.id == selection.instance_id)
                decision = evaluate(
                    facts_of(
                        [(r.calling_ae_title, r.attributes or {}) for r in rows],
                        (chosen.calling_ae_title, chosen.attributes or {}),
                    ),
                    self.settings.routing_rules,
                )
                values.update(priority=decision.priority.value, routing=decision.as_json())
                if decision.skipped:
                    target, reason = StudyState.SKIPPED, str(decision.reason)
                else:
                    rule = f"rule {decision.rule}" if decision.rule else "no rule matched"
                    reason = f"{selection.reason}; priority {decision.priority.value} ({rule})"
            session.execute(
                update(Study).where(Study.id == study_id).values(**values).execution_options(synchronize_session=False)
            )
            if not transition(session, study_id, target, reason):
                session.rollback()
                return None
        log.info(
            "study assembled",
            extra={
                "study_id": study_id,
                "state": target.value,
                "reason": reason,
                "instances": len(rows),
                "selected_instance_id": selection.instance_id,
                "complete": complete,
                "rule": decision.rule if decision else None,
                "priority": decision.priority.value if decision else None,
            },
        )
        if target is StudyState.QUEUED and self.enqueue is not None:
            try:
                self.enqueue(study_id)
            except Exception as exc:  # noqa: BLE001 - QUEUED in the registry is the contract
                log.warning(
                    "enqueue failed; the reconciler will re-send",
                    extra={"study_id": study_id, "error": type(exc).__name__},
                )
        return target

    def tick(self, now: datetime | None = None) -> dict[int, StudyState]:
        """One pass: studies completed by a trusted router first, then every due study; returns what moved."""
        moved: dict[int, StudyState] = {}
        for study_id in sorted(self._take_complete()):
            state = self.assemble(study_id, now, complete=True)
            if state is not None:
                moved[study_id] = state
        for study_id in self.due_studies(now):
            state = self.assemble(study_id, now)
            if state is not None:
                moved[study_id] = state
        return moved

    # -- thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.tick()
            except SQLAlchemyError as exc:
                log.error("assembler pass failed", extra={"error": db_error_kind(exc)})
            except Exception:
                log.exception("assembler pass failed")

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="study-assembler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
