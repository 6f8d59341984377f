"""Registry-side plumbing of the workers against the real Redis (db 11) and both registries: claims,
batches, enqueue, the reconciler, re-run, queue depth. No model here: see test_pipeline.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from sqlalchemy import select, update

from radialog.messaging import QUEUES, REPORT_TASK, app_for, enqueue_report, rerun
from radialog.registry import Export, Job, JobState, Registry, Study, StudyState, transition, utcnow
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.seeding import add_study
from workers.batching import claim, collect_batch, requeue
from workers.metrics import register_queue_depth
from workers.reconciler import broker_task_ids, reconcile

#: Where kombu keeps a waiting ROUTINE report message on Redis (priority 3: "<queue>\x06\x16<priority>").
ROUTINE_LIST = "report\x06\x163"
REDIS_URL = redis_url(__name__)


@pytest.fixture
def rsettings(settings: Settings) -> Iterator[Settings]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield settings.model_copy(update={"broker_url": REDIS_URL})
    client.flushdb()
    client.close()


def _job(registry: Registry, job_id: int) -> Job:
    with registry.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _study_state(registry: Registry, study_id: int) -> str:
    with registry.session() as session:
        return session.get(Study, study_id).state  # type: ignore[union-attr]


def test_app_routes_and_delivery_guarantees(rsettings: Settings) -> None:
    app = app_for(rsettings)
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert app.conf.broker_transport_options["visibility_timeout"] == rsettings.visibility_timeout
    assert app.amqp.router.route({}, REPORT_TASK)["queue"].name == "report"
    assert app.amqp.router.route({}, "radialog.dialog_turn")["queue"].name == "dialog"
    assert app.amqp.router.route({}, "radialog.export")["queue"].name == "export"


def test_enqueue_is_idempotent_and_the_task_is_in_the_broker(registry: Registry, rsettings: Settings) -> None:
    study_id, _ = add_study(registry, rsettings)
    job_id = enqueue_report(registry, rsettings, study_id)
    assert enqueue_report(registry, rsettings, study_id) == job_id
    job = _job(registry, job_id)
    assert job.state == JobState.QUEUED.value and job.model_name == rsettings.model_backend
    assert job.celery_task_id in (broker_task_ids(rsettings) or set())


def test_claim_is_exclusive_and_a_stale_lease_is_taken_over(registry: Registry, rsettings: Settings) -> None:
    study_id, _ = add_study(registry, rsettings)
    job_id = enqueue_report(registry, rsettings, study_id)
    with registry.session() as session:
        first = claim(session, job_id, "w1", lease_s=30)
    with registry.session() as session:
        assert claim(session, job_id, "w2", lease_s=30) is None  # w1's lease is live
    assert first is not None and first.attempt == 1
    assert _study_state(registry, study_id) == StudyState.RUNNING.value
    with registry.session() as session:  # w1 stops renewing its lease
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    with registry.session() as session:
        second = claim(session, job_id, "w2", lease_s=30)
    assert second is not None and second.attempt == 2
    assert _job(registry, job_id).worker == "w2"
    with registry.session() as session:
        assert requeue(session, job_id, "test")
    assert _job(registry, job_id).state == JobState.QUEUED.value
    assert _study_state(registry, study_id) == StudyState.QUEUED.value


def test_collect_batch_takes_waiting_jobs_up_to_the_batch_size(registry: Registry, rsettings: Settings) -> None:
    jobs = [enqueue_report(registry, rsettings, add_study(registry, rsettings, index=i)[0]) for i in range(5)]
    common: dict[str, Any] = {"worker": "w1", "model_name": rsettings.model_backend, "wait_s": 0.0, "lease_s": 30}
    batch = collect_batch(registry, jobs[3], batch_size=3, **common)
    assert [c.job_id for c in batch] == [jobs[3], jobs[0], jobs[1]]  # its own job, then the oldest
    rest = collect_batch(registry, jobs[2], batch_size=3, **common)
    assert [c.job_id for c in rest] == [jobs[2], jobs[4]]
    assert collect_batch(registry, jobs[0], batch_size=3, **common) == []  # running: a duplicate message


def test_reconciler_resends_what_a_flushed_broker_forgot(registry: Registry, rsettings: Settings) -> None:
    jobs = [enqueue_report(registry, rsettings, add_study(registry, rsettings, index=i)[0]) for i in range(3)]
    assert reconcile(registry, rsettings, grace_s=0).resent_queued == []  # the broker has them all
    redis.Redis.from_url(REDIS_URL).flushdb()
    result = reconcile(registry, rsettings, grace_s=0)
    assert sorted(result.resent_queued) == sorted(jobs)
    present = broker_task_ids(rsettings) or set()
    assert all(_job(registry, j).celery_task_id in present for j in jobs)
    assert reconcile(registry, rsettings, grace_s=0).resent_queued == []


def test_reconciler_requeues_a_dead_workers_job(registry: Registry, rsettings: Settings) -> None:
    study_id, _ = add_study(registry, rsettings)
    job_id = enqueue_report(registry, rsettings, study_id)
    with registry.session() as session:
        claim(session, job_id, "dead-worker", lease_s=30)
    assert reconcile(registry, rsettings, lease_s=30, grace_s=0).requeued_running == []
    with registry.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=31)))
    assert reconcile(registry, rsettings, lease_s=30, grace_s=0).requeued_running == [job_id]
    job = _job(registry, job_id)
    assert job.state == JobState.QUEUED.value and job.celery_task_id in (broker_task_ids(rsettings) or set())
    assert _study_state(registry, study_id) == StudyState.QUEUED.value


def test_reconciler_enqueues_a_queued_study_without_a_job(registry: Registry, rsettings: Settings) -> None:
    study_id, _ = add_study(registry, rsettings)  # QUEUED, but the node never called enqueue
    assert reconcile(registry, rsettings, grace_s=0).enqueued_studies == [study_id]
    with registry.session() as session:
        assert session.scalars(select(Job).where(Job.study_id == study_id)).one().state == JobState.QUEUED.value


def add_failed_job(registry: Registry, settings: Settings) -> tuple[int, int]:
    """A study whose report job ran once and FAILED (study FAILED too); returns (study id, job id)."""
    from workers.pipeline import fail_job

    study_id, _ = add_study(registry, settings)
    job_id = enqueue_report(registry, settings, study_id)
    with registry.session() as session:
        claimed = claim(session, job_id, "w1", lease_s=30)
    assert claimed is not None
    fail_job(registry, claimed, "unusable image: test", "unusable_image")
    return study_id, job_id


def test_rerun_resets_a_failed_job(registry: Registry, rsettings: Settings) -> None:
    study_id, job_id = add_failed_job(registry, rsettings)
    assert enqueue_report(registry, rsettings, study_id) == job_id
    assert _job(registry, job_id).state == JobState.FAILED.value  # not re-run by a stray enqueue
    assert rerun(registry, rsettings, study_id) == job_id
    job = _job(registry, job_id)
    assert (job.state, job.attempts, job.error) == (JobState.QUEUED.value, 0, None)
    assert rerun(registry, rsettings, study_id) is None  # QUEUED is not re-runnable


def test_queue_depth_metric_counts_waiting_messages(sqlite_registry: Registry, rsettings: Settings) -> None:
    for i in range(3):
        enqueue_report(sqlite_registry, rsettings, add_study(sqlite_registry, rsettings, index=i)[0])
    metrics_registry = CollectorRegistry()
    register_queue_depth(rsettings, metrics_registry)
    depth = {q: metrics_registry.get_sample_value("radialog_queue_depth", {"queue": q}) for q in QUEUES}
    assert depth == {"dialog": 0.0, "export": 0.0, "report": 3.0}


def test_out_of_memory_caps_later_batches(sqlite_registry: Registry, rsettings: Settings) -> None:
    from workers.context import WorkerContext

    ctx = WorkerContext(settings=rsettings, registry=sqlite_registry, hostname="w1")
    assert ctx.batch_limit(8) == 8
    ctx.out_of_memory_at(8)
    ctx.out_of_memory_at(6)  # a split half that failed too
    assert ctx.batch_limit(8) == 3
    ctx.out_of_memory_at(8)  # a larger failure does not raise the cap again
    assert ctx.batch_limit(8) == 3 and ctx.batch_limit(2) == 2


def test_reconciler_resends_a_dialog_turn_the_broker_forgot(sqlite_registry: Registry, rsettings: Settings) -> None:
    from radialog.messaging import DIALOG_TASK
    from radialog.registry import Conversation, DialogTurn
    from tests.support.seeding import add_reported_study

    study_id = add_reported_study(sqlite_registry, rsettings)
    with sqlite_registry.session() as session:
        conversation = Conversation(study_id=study_id, user="rad", created_at=utcnow())
        session.add(conversation)
        session.flush()
        turn = DialogTurn(
            conversation_id=conversation.id,
            task="free",
            question="Is there any edema?",
            state="QUEUED",
            celery_task_id="t-1",
            created_at=utcnow(),
        )
        session.add(turn)
        session.flush()
        turn_id = turn.id
    app_for(rsettings).send_task(DIALOG_TASK, args=[turn_id], task_id="t-1", queue="dialog")
    assert reconcile(sqlite_registry, rsettings, grace_s=0).resent_dialog_turns == []
    redis.Redis.from_url(REDIS_URL).flushdb()
    assert reconcile(sqlite_registry, rsettings, grace_s=0).resent_dialog_turns == [turn_id]
    with sqlite_registry.session() as session:
        task_id = session.get(DialogTurn, turn_id).celery_task_id  # type: ignore[union-attr]
    assert task_id != "t-1" and task_id in (broker_task_ids(rsettings, "dialog") or set())


def test_sweep_sends_due_exports_and_one_sweeper_takes_each_turn(
    sqlite_registry: Registry, rsettings: Settings
) -> None:
    from radialog.settings import Destination
    from tests.support.seeding import add_reported_study
    from workers.reconciler import Sweeper, send_due_exports

    settings = rsettings.model_copy(update={"destinations": [Destination(name="pacs", port=1)]})
    add_reported_study(sqlite_registry, settings)
    with sqlite_registry.session() as session:
        (export_id,) = session.scalars(select(Export.id)).all()
    assert send_due_exports(sqlite_registry, settings) == [export_id]
    client = redis.Redis.from_url(REDIS_URL)
    bodies = [json.loads(raw) for raw in client.lrange("export", 0, -1)]
    assert [(b["headers"]["task"], b["headers"]["argsrepr"]) for b in bodies] == [("radialog.export", f"[{export_id}]")]
    first, second = (Sweeper(sqlite_registry, settings, interval_s=30) for _ in range(2))
    assert first._my_turn() and not second._my_turn()


def test_worker_metrics_endpoint_serves_stage_and_queue_metrics(sqlite_registry: Registry, rsettings: Settings) -> None:

    import httpx

    from workers import metrics

    enqueue_report(sqlite_registry, rsettings, add_study(sqlite_registry, rsettings)[0])
    metrics.STAGE_SECONDS.labels(stage="preprocess").observe(0.01)
    port = free_port()
    server = metrics.start_metrics_server(rsettings, port, addr="127.0.0.1")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.shutdown()
    assert 'radialog_queue_depth{queue="report"} 1.0' in text
    assert 'radialog_job_stage_seconds_count{stage="preprocess"}' in text


def test_engine_metrics_count_sequences_slots_and_steps(tiny_model) -> None:
    """The engine collector reads a real engine: two reports decoding then none, slots, decode steps."""
    import torch
    from prometheus_client import CollectorRegistry

    from radialog.synthetic import chest_pixels
    from workers.engine import Engine, EngineConfig
    from workers.metrics import register_engine
    from workers.models.radialog_v2.backend import load_radialog_v2

    engine = Engine(load_radialog_v2(*tiny_model, device="cpu"), EngineConfig(report_slots=3, dialog_slots=1))
    registry = CollectorRegistry()
    register_engine(engine, registry)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert (
        sample("radialog_engine_slots", kind="report") == 3.0 and sample("radialog_engine_slots", kind="dialog") == 1.0
    )
    images = [chest_pixels(600, 520, 8, seed=i).astype("uint8") for i in range(2)]
    handles = engine.submit_reports(images, max_new_tokens=8, min_new_tokens=8)
    engine._take_inbox()  # the engine thread is not started: step it by hand, deterministically
    assert sample("radialog_engine_sequences", kind="report", state="waiting") == 2.0
    with torch.inference_mode():  # as the engine thread runs its loop
        engine._iteration()
        assert sample("radialog_engine_sequences", kind="report", state="decoding") == 2.0
        while engine.busy:
            engine._iteration()
    assert [len(h.result(0).tokens) for h in handles] == [8, 8]
    assert sample("radialog_engine_sequences", kind="report", state="decoding") == 0.0
    assert sample("radialog_engine_decode_steps_total") == 7.0  # the first token comes from the prefill


def test_dialog_history_seeds_the_report_and_keeps_view_turns_apart(sqlite_registry, settings) -> None:
    """Follow-ups see the report turn and earlier answers; the view question is a first turn of its own."""
    from radialog.registry import Conversation, DialogTurn, utcnow
    from tests.support.seeding import add_reported_study
    from workers.dialog import build_history
    from workers.models.prompts import VIEW_PROMPT, report_prompt, yes_no_prompt

    study_id = add_reported_study(sqlite_registry, settings, findings_text="Small left effusion.")
    with sqlite_registry.session() as session:
        conversation = Conversation(study_id=study_id, user="rad", created_at=utcnow())
        session.add(conversation)
        session.flush()
        turns = [
            DialogTurn(
                conversation_id=conversation.id,
                task="view",
                question=VIEW_PROMPT,
                answer="PA view.",
                state="DONE",
                created_at=utcnow(),
            ),
            DialogTurn(
                conversation_id=conversation.id,
                task="yes_no",
                question=yes_no_prompt("edema"),
                answer="No.",
                state="DONE",
                created_at=utcnow(),
            ),
            DialogTurn(
                conversation_id=conversation.id, task="view", question=VIEW_PROMPT, state="QUEUED", created_at=utcnow()
            ),
            DialogTurn(
                conversation_id=conversation.id,
                task="free",
                question="Any devices?",
                state="QUEUED",
                created_at=utcnow(),
            ),
        ]
        session.add_all(turns)
        session.flush()
        assert build_history(session, turns[2]) == []  # view: no history, the image is in its question
        history = build_history(session, turns[3])
        assert history[0].question == report_prompt("pleural effusion")
        assert history[0].answer == "Small left effusion."
        assert [t.question for t in history[1:]] == [yes_no_prompt("edema")]  # the view turn is left out


def test_reconciler_finishes_a_rerun_that_died_half_way(registry: Registry, rsettings: Settings) -> None:
    """The study was moved back to QUEUED, then the process died before its FAILED job was reset."""
    study_id, job_id = add_failed_job(registry, rsettings)
    with registry.session() as session:
        assert transition(session, study_id, StudyState.QUEUED, "re-run requested")  # ... and nothing more
    assert reconcile(registry, rsettings, grace_s=0).enqueued_studies == [study_id]
    job = _job(registry, job_id)
    assert job.state == JobState.QUEUED.value and job.celery_task_id in (broker_task_ids(rsettings) or set())


def test_a_worker_that_lost_its_lease_cannot_fail_the_job(registry: Registry, rsettings: Settings) -> None:
    """Worker w1 stalls past its lease, w2 takes the job over; w1's late failure changes nothing."""
    from workers.pipeline import fail_job

    study_id, _ = add_study(registry, rsettings)
    job_id = enqueue_report(registry, rsettings, study_id)
    with registry.session() as session:
        first = claim(session, job_id, "w1", lease_s=30)
    time.sleep(0.01)
    with registry.session() as session:
        second = claim(session, job_id, "w2", lease_s=0.0)  # w2 counts w1's silence as a lapsed lease
    assert first is not None and second is not None and second.attempt == first.attempt + 1
    fail_job(registry, first, "model error from the stalled worker", "model_error")
    job = _job(registry, job_id)
    assert (job.state, job.worker, job.error) == (JobState.RUNNING.value, "w2", None)
    assert _study_state(registry, study_id) == StudyState.RUNNING.value


def test_a_dialog_turn_left_running_by_a_dead_worker_fails_with_a_reason(
    sqlite_registry: Registry, rsettings: Settings
) -> None:
    from radialog.registry import Conversation, DialogTurn
    from tests.support.seeding import add_reported_study
    from workers.reconciler import STUCK_DIALOG_TURN_S

    study_id = add_reported_study(sqlite_registry, rsettings)
    asked = utcnow() - timedelta(seconds=STUCK_DIALOG_TURN_S + 60)
    with sqlite_registry.session() as session:
        conversation = Conversation(study_id=study_id, user="rad", created_at=asked)
        session.add(conversation)
        session.flush()
        old, fresh = (
            DialogTurn(conversation_id=conversation.id, task="free", question=q, state="RUNNING", created_at=at)
            for q, at in (("Any edema?", asked), ("Any effusion?", utcnow()))
        )
        # asked ten minutes ago and never taken (its message held by a worker that died)
        never = DialogTurn(
            conversation_id=conversation.id,
            task="free",
            question="Any fracture?",
            state="QUEUED",
            created_at=asked,
            celery_task_id="held-by-a-dead-worker",
        )
        session.add_all([old, fresh, never])
        session.flush()
        old_id, fresh_id, never_id = old.id, fresh.id, never.id
    result = reconcile(sqlite_registry, rsettings, grace_s=0)
    assert sorted(result.failed_dialog_turns) == sorted([old_id, never_id])
    assert result.resent_dialog_turns == []  # failed, not re-sent to be answered late
    with sqlite_registry.session() as session:
        stuck, running = session.get(DialogTurn, old_id), session.get(DialogTurn, fresh_id)
        assert stuck.state == "FAILED" and "stopped while answering" in (stuck.error or "")
        assert stuck.error_kind == "WORKER_LOST"
        assert running.state == "RUNNING" and running.error_kind is None  # being answered now: left alone
        waited = session.get(DialogTurn, never_id)
        assert waited.state == "FAILED" and "ask again" in (waited.error or "")
        assert waited.error_kind == "NOT_TAKEN"


def test_given_back_jobs_carry_the_id_of_their_new_message(sqlite_registry: Registry, rsettings: Settings) -> None:
    """After a transient error the jobs go back with new messages; the registry holds those messages' ids,
    so the reconciler finds them in the broker instead of sending duplicates."""
    from workers.batching import Claim
    from workers.context import WorkerContext
    from workers.pipeline import give_back

    jobs = [
        enqueue_report(sqlite_registry, rsettings, add_study(sqlite_registry, rsettings, index=i)[0]) for i in range(2)
    ]
    first_ids = {j: _job(sqlite_registry, j).celery_task_id for j in jobs}
    with sqlite_registry.session() as session:
        claims: list[Claim] = [c for j in jobs if (c := claim(session, j, "w1", lease_s=30)) is not None]
    assert len(claims) == 2
    redis.Redis.from_url(REDIS_URL).flushdb()  # only the new messages are in the broker from here on
    ctx = WorkerContext(settings=rsettings, registry=sqlite_registry, hostname="w1")
    give_back(ctx, claims, "registry unavailable", except_job=jobs[0])  # jobs[0]: Celery retries its own
    second = _job(sqlite_registry, jobs[1])
    assert second.state == JobState.QUEUED.value and second.celery_task_id != first_ids[jobs[1]]
    assert second.celery_task_id in (broker_task_ids(rsettings) or set())
    assert _job(sqlite_registry, jobs[0]).state == JobState.QUEUED.value
    assert reconcile(sqlite_registry, rsettings, grace_s=0).resent_queued == [jobs[0]]  # only the one Celery owns


def test_a_queued_jobs_message_held_by_a_dead_worker_is_sent_again(
    sqlite_registry: Registry, rsettings: Settings
) -> None:
    """A worker fetched the message (kombu moved it to the unacked hash) and died before the job started:
    Redis would restore it only after the visibility timeout (an hour). Delivered over a minute ago ->
    re-sent; delivered just now (a live worker is about to start it) -> left alone; a retry's message
    delivered long ago but due later (its ETA) -> left alone."""
    import time
    from datetime import UTC, datetime

    from workers.broker_state import START_GRACE_S

    client = redis.Redis.from_url(REDIS_URL)
    jobs = [
        enqueue_report(sqlite_registry, rsettings, add_study(sqlite_registry, rsettings, index=i)[0]) for i in range(3)
    ]
    long_ago = time.time() - START_GRACE_S - 60
    eta = datetime.fromtimestamp(time.time() + 300, UTC).isoformat()
    cases = (("tag-old", long_ago, None), ("tag-new", time.time(), None), ("tag-eta", long_ago, eta))
    for tag, delivered, due in cases:
        # what kombu's Redis QoS does on delivery: out of the list (a ROUTINE study's message waits in the
        # priority-3 sub-list, issue 19), into unacked
        raw = client.rpop(ROUTINE_LIST)
        assert raw is not None
        message = json.loads(raw)
        message["headers"]["eta"] = due  # as Celery writes a countdown
        client.hset("unacked", tag, json.dumps([message, "report", "report"]))
        client.zadd("unacked_index", {tag: delivered})
    assert client.llen(ROUTINE_LIST) == 0
    held = {
        tag: json.loads(client.hget("unacked", tag))[0]["headers"]["argsrepr"]
        for tag in ("tag-old", "tag-new", "tag-eta")
    }
    old_job = next(j for j in jobs if held["tag-old"] == f"[{j}]")
    assert reconcile(sqlite_registry, rsettings, grace_s=0).resent_queued == [old_job]
    assert _job(sqlite_registry, old_job).celery_task_id in (broker_task_ids(rsettings) or set())
    assert reconcile(sqlite_registry, rsettings, grace_s=0).resent_queued == []
    client.close()


def test_dialog_history_of_an_xraygpt_conversation_opens_with_its_report_question(sqlite_registry, settings) -> None:
    """Issue 16: the seed turn is the question XrayGPT wrote the report for (not RaDialog's findings prompt),
    and nothing is a first-turn task there."""
    from radialog.registry import Conversation, DialogTurn, utcnow
    from tests.support.seeding import add_reported_study
    from workers.dialog import build_history
    from workers.models.capabilities import XRAYGPT
    from workers.models.xraygpt.prompts import IMPRESSION, REPORT_QUESTION

    study_id = add_reported_study(sqlite_registry, settings, findings_text="Mild cardiomegaly.")
    with sqlite_registry.session() as session:
        conversation = Conversation(study_id=study_id, user="rad", created_at=utcnow())
        session.add(conversation)
        session.flush()
        turns = [
            DialogTurn(
                conversation_id=conversation.id,
                task="impression",
                question=IMPRESSION,
                answer="Cardiomegaly.",
                state="DONE",
                created_at=utcnow(),
            ),
            DialogTurn(
                conversation_id=conversation.id,
                task="free",
                question="Any devices?",
                state="QUEUED",
                created_at=utcnow(),
            ),
        ]
        session.add_all(turns)
        session.flush()
        history = build_history(session, turns[1], XRAYGPT)
        assert [(t.question, t.answer) for t in history] == [
            (REPORT_QUESTION, "Mild cardiomegaly."),
            (IMPRESSION, "Cardiomegaly."),
        ]


def test_embedded_broker_message_held_by_a_dead_worker_is_sent_again(
    sqlite_registry: Registry, settings: Settings
) -> None:
    """kombu's SQLAlchemy transport (``radialog run`` without Redis) keeps a delivered message as an
    invisible row stamped with its delivery time: due and unclaimed for over a minute -> re-sent."""
    from datetime import datetime

    from sqlalchemy import create_engine, text

    from composition.run import embedded_broker
    from workers.broker_state import START_GRACE_S

    esettings = embedded_broker(settings)
    jobs = [
        enqueue_report(sqlite_registry, esettings, add_study(sqlite_registry, esettings, index=i)[0]) for i in range(2)
    ]
    assert broker_task_ids(esettings) == {_job(sqlite_registry, j).celery_task_id for j in jobs}
    assert reconcile(sqlite_registry, esettings, grace_s=0).resent_queued == []  # both wait in the queue
    with app_for(esettings).connection_for_read() as conn:  # a worker takes one message ... and dies (the
        taken = conn.SimpleQueue("report", no_ack=False).get(timeout=10)  # connection stays open: a clean
        held_job = taken.headers["argsrepr"]  # close would put the message back, a dead worker cannot)
        assert reconcile(sqlite_registry, esettings, grace_s=0).resent_queued == []  # just delivered: may start
        engine = create_engine(esettings.broker_url.removeprefix("sqla+"))
        with engine.begin() as db:  # delivered over a minute ago, as kombu stamps it (local time)
            stale = datetime.fromtimestamp(time.time() - START_GRACE_S - 30).isoformat(sep=" ")
            db.execute(text("UPDATE kombu_message SET timestamp = :t WHERE NOT visible"), {"t": stale})
        engine.dispose()
        resent = reconcile(sqlite_registry, esettings, grace_s=0).resent_queued
        assert [f"[{j}]" for j in resent] == [held_job]
        assert _job(sqlite_registry, resent[0]).celery_task_id in (broker_task_ids(esettings) or set())


# -- which study crashed the worker (workers/crashes.py) ------------------------------------------------
def _lapse(registry: Registry, job_ids: list[int]) -> None:
    """The worker holding these jobs died: its heartbeats stopped a minute ago."""
    with registry.session() as session:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(heartbeat_at=utcnow() - timedelta(seconds=60)))


def _claim_alone(registry: Registry, job_id: int) -> Any:
    from workers.crashes import ALONE, mark_running

    batch = collect_batch(registry, job_id, worker="w1", model_name="radialog-v2", batch_size=8, wait_s=0.0, lease_s=30)
    assert [c.job_id for c in batch] == [job_id] and batch[0].isolated
    mark_running(registry, [(job_id, batch[0].attempt)], ALONE)
    return batch[0]


def test_jobs_lost_while_running_together_run_alone_next_and_are_not_charged(
    registry: Registry, rsettings: Settings
) -> None:
    from workers.crashes import BATCH, mark_running

    jobs = [enqueue_report(registry, rsettings, add_study(registry, rsettings, index=i)[0]) for i in range(4)]
    batch = collect_batch(
        registry, jobs[0], worker="w1", model_name=rsettings.model_backend, batch_size=3, wait_s=0.0, lease_s=30
    )
    mark_running(registry, [(c.job_id, c.attempt) for c in batch], BATCH)
    ran = [c.job_id for c in batch]
    _lapse(registry, ran)
    result = reconcile(registry, rsettings, lease_s=30, grace_s=0)
    assert sorted(result.requeued_running) == sorted(ran) and result.failed_crashing == []
    for job_id in ran:
        job = _job(registry, job_id)
        assert (job.state, job.isolated, job.crashes, job.lost_claims, job.run_mode) == ("QUEUED", True, 0, 1, None)
        assert job.celery_task_id in (broker_task_ids(rsettings) or set())
    # the untouched fourth job batches as usual; it never takes a suspect as a companion
    rest = collect_batch(
        registry, jobs[3], worker="w1", model_name=rsettings.model_backend, batch_size=8, wait_s=0.0, lease_s=30
    )
    assert [c.job_id for c in rest] == [jobs[3]] and not rest[0].isolated
    alone = collect_batch(
        registry, ran[1], worker="w1", model_name=rsettings.model_backend, batch_size=8, wait_s=0.0, lease_s=30
    )
    assert [c.job_id for c in alone] == [ran[1]]  # a batch of one, though two more suspects wait
    assert alone[0].isolated and (alone[0].attempt, alone[0].charged) == (2, 1)


def test_a_job_that_crashes_its_worker_alone_is_charged_and_fails_at_the_limit(
    registry: Registry, rsettings: Settings
) -> None:
    from workers.crashes import MAX_CRASHES

    study_id, _ = add_study(registry, rsettings)
    job_id = enqueue_report(registry, rsettings, study_id)
    with registry.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(isolated=True))
    for crash in range(1, MAX_CRASHES + 1):
        _claim_alone(registry, job_id)
        _lapse(registry, [job_id])
        result = reconcile(registry, rsettings, lease_s=30, grace_s=0)
        job = _job(registry, job_id)
        assert job.crashes == crash and job.lost_claims == 0
        if crash < MAX_CRASHES:
            assert result.requeued_running == [job_id] and job.state == JobState.QUEUED.value
    assert result.failed_crashing == [job_id] and result.requeued_running == []
    assert job.state == JobState.FAILED.value and job.error is not None and "alone" in job.error
    with registry.session() as session:
        study = session.get(Study, study_id)
        assert study.state == StudyState.FAILED.value and "worker process died 2 times" in (study.reason or "")
    # re-run by an admin: fresh counts, and it still runs alone
    assert rerun(registry, rsettings, study_id) == job_id
    job = _job(registry, job_id)
    assert (job.state, job.attempts, job.crashes, job.lost_claims, job.isolated) == ("QUEUED", 0, 0, 0, True)


def test_a_claim_lost_before_its_work_started_is_requeued_as_it_was(registry: Registry, rsettings: Settings) -> None:
    """Claimed, then waiting for the gate (another job ran alone) when the worker died: no evidence."""
    study_id, _ = add_study(registry, rsettings)
    job_id = enqueue_report(registry, rsettings, study_id)
    with registry.session() as session:
        assert claim(session, job_id, "w1", lease_s=30) is not None
    _lapse(registry, [job_id])
    with registry.session() as session:  # its message comes back to a worker before the reconciler sees it
        again = claim(session, job_id, "w2", lease_s=30)
    assert again is not None and (again.attempt, again.charged, again.isolated) == (2, 1, False)
    job = _job(registry, job_id)
    assert (job.state, job.worker, job.lost_claims, job.crashes) == ("RUNNING", "w2", 1, 0)


def test_a_worker_that_receives_the_message_of_a_job_lost_alone_charges_it(
    registry: Registry, rsettings: Settings
) -> None:
    study_id, _ = add_study(registry, rsettings)
    job_id = enqueue_report(registry, rsettings, study_id)
    with registry.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(isolated=True))
    _claim_alone(registry, job_id)
    _lapse(registry, [job_id])
    with registry.session() as session:
        again = claim(session, job_id, "w2", lease_s=30)
    assert again is not None and again.isolated and again.charged == 2
    assert _job(registry, job_id).crashes == 1


def test_gate_lets_batches_share_and_a_lone_job_wait_for_them_and_go_first() -> None:
    import threading

    from workers.crashes import Gate

    gate = Gate()
    order: list[str] = []
    lone_waiting = threading.Event()
    release_first = threading.Event()

    def batch(name: str, hold: threading.Event | None = None) -> None:
        with gate.shared():
            order.append(f"{name} in")
            if hold is not None:
                hold.wait(10)
            order.append(f"{name} out")

    def lone() -> None:
        lone_waiting.set()
        with gate.exclusive():
            order.append("lone in")
            order.append("lone out")

    first = threading.Thread(target=batch, args=("b1", release_first))
    first.start()
    wait_for(lambda: "b1 in" in order, what="b1 in", timeout=10, interval=0.01)
    second = threading.Thread(target=lone)
    second.start()
    lone_waiting.wait(10)
    wait_for(lambda: gate._waiting_exclusive, what="the lone job waiting for b1", timeout=10, interval=0.01)
    third = threading.Thread(target=batch, args=("b2",))
    third.start()
    time.sleep(0.1)  # b2 must not start while the lone job waits (it could only start wrongly here)
    assert order == ["b1 in"]
    release_first.set()
    for thread in (first, second, third):
        thread.join(10)
    assert order == ["b1 in", "b1 out", "lone in", "lone out", "b2 in", "b2 out"]


def test_a_restarted_workers_first_sweep_ignores_the_dead_workers_lock(
    sqlite_registry: Registry, rsettings: Settings
) -> None:
    """The sweep lock a crashed worker took may outlive it: its successor sweeps at start anyway, so the
    claims it lost come back without waiting for the lock to expire."""
    from workers.reconciler import Sweeper

    study_id, _ = add_study(sqlite_registry, rsettings)
    job_id = enqueue_report(sqlite_registry, rsettings, study_id)
    with sqlite_registry.session() as session:
        assert claim(session, job_id, "w-dead", lease_s=30) is not None
    _lapse(sqlite_registry, [job_id])
    client = redis.Redis.from_url(REDIS_URL)
    client.set(Sweeper.LOCK_KEY, "1", px=60_000)  # taken by the dead process just before it died
    sweeper = Sweeper(sqlite_registry, rsettings, interval_s=30, lease_s=30)
    sweeper._stop.set()  # one pass of the loop, in this thread
    sweeper._loop()
    assert _job(sqlite_registry, job_id).state == JobState.QUEUED.value
    assert not sweeper._my_turn()  # later passes still take turns
    client.close()


def test_sending_a_job_while_the_broker_is_down_fails_with_the_brokers_error(settings: Settings) -> None:
    """The sender does not subscribe to the task's result (outcomes are in the registry): with Redis down
    the send fails at once with the broker's connection error, so the node's enqueue hands the job to
    the reconciler, instead of first retrying the result backend for ~19 s and raising RuntimeError."""
    from kombu.exceptions import OperationalError as BrokerDown

    from radialog.messaging import send_export_tasks, send_report_task

    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with pytest.raises(BrokerDown):
        send_report_task(down, 1, "t-broker-down")
    with pytest.raises(BrokerDown):
        send_export_tasks(down, [1])


def test_dialog_history_of_a_radialog_v1_conversation_opens_with_its_report_prompt(sqlite_registry, settings) -> None:
    """Issue 17: the seed turn is v1's report prompt (32 <IMG> and the seed's findings), not v2's <image> one."""
    from radialog.registry import Conversation, DialogTurn, utcnow
    from tests.support.seeding import add_reported_study
    from workers.dialog import build_history
    from workers.models.capabilities import RADIALOG_V1
    from workers.models.radialog_v1.prompts import report_prompt

    study_id = add_reported_study(
        sqlite_registry, settings, findings_text="Small left effusion.", present=("No Finding", "Pleural Effusion")
    )
    with sqlite_registry.session() as session:
        conversation = Conversation(study_id=study_id, user="rad", created_at=utcnow())
        session.add(conversation)
        session.flush()
        turn = DialogTurn(
            conversation_id=conversation.id,
            task="yes_no",
            question="Is there any Edema?",
            state="QUEUED",
            created_at=utcnow(),
        )
        session.add(turn)
        session.flush()
        history = build_history(session, turn, RADIALOG_V1)
    assert [(t.question, t.answer) for t in history] == [(report_prompt("pleural effusion"), "Small left effusion.")]
    assert history[0].question.count("<IMG>") == 32 and "<image>" not in history[0].question
