"""Studies that crash the worker process, with real ``radialog worker`` subprocesses that really die.

The worker runs through ``tests.support.crashing_worker`` (a test-only launcher): a listed study's image
makes the engine thread segfault while the whole batch is in flight. A supervisor thread restarts the
worker each time it dies, as compose's restart policy does, and the worker's own sweeper recovers the
lost claims. The crashing studies must fail alone; every other study of their batch must be reported once.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from composition.run import embedded_broker
from radialog.messaging import enqueue_report
from radialog.registry import Registry, StudyEvent, StudyState
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.crashing_worker import CRASH_IMAGES_ENV, image_key
from tests.support.processes import Process, radialog_process
from tests.support.seeding import add_study
from tests.test_pipeline import Harness
from workers.pipeline import load_image

REDIS_URL = redis_url(__name__)
WAIT_S = 900.0
LAUNCHER = "tests.support.crashing_worker"


class Supervisor:
    """Keeps one worker running: a dead one is started again (same name); how each run ended is kept."""

    def __init__(self, harness: Harness, name: str, env: dict[str, str]) -> None:
        self.harness = harness
        self.name = name
        self.env = env
        self.deaths: list[int] = []
        self.died_at: list[float] = []  # wall clock (time.time()) when each death was seen
        self.runs: list[Process] = []
        self._stop = threading.Event()
        self._start()
        self._thread = threading.Thread(target=self._watch, name="test-supervisor", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        args = ["worker", "--hostname", self.name, "--lease-seconds", "3"]  # with its sweeper, as deployed
        self.runs.append(
            radialog_process(f"{self.name}-run{len(self.runs)}", args, self.env, self.harness.tmp, module=LAUNCHER)
        )

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            code = self.runs[-1].returncode
            if code is not None:
                self.deaths.append(code)
                self.died_at.append(time.time())
                self._start()

    def started_at(self) -> list[float]:
        """When each run logged "worker starting" (its model loaded), from its own JSON log."""
        found = []
        for run in self.runs:
            for line in run.output().splitlines():
                if '"worker starting"' in line:
                    found.append(datetime.fromisoformat(json.loads(line)["ts"]).timestamp())
                    break
        return found

    def logs(self) -> str:
        return "\n".join(f"--- {run.name}\n{run.last_lines(25)}" for run in self.runs)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.runs[-1].stop()


@pytest.fixture
def crash_harness(
    tmp_path: Path, settings: Settings, sqlite_registry: Registry, tiny_model: tuple[Path, Path]
) -> Iterator[Harness]:
    h = Harness(
        tmp_path,
        sqlite_registry,
        settings.model_copy(update={"batch_size": 8, "batch_wait_ms": 0}),
        tiny_model,
        redis_url=REDIS_URL,
    )
    yield h
    h.close()


def crash_keys(h: Harness, study_ids: list[int]) -> str:
    """The launcher's crash list for ``study_ids``: their images exactly as the worker will load them."""
    return ",".join(image_key(load_image(h.registry, h.settings, s)) for s in study_ids)


def run_crashing_batch(
    h: Harness, env: dict[str, Any], first_index: int, size: int, crashing_at: list[int]
) -> tuple[list[int], list[int], Supervisor]:
    """``size`` studies queued before the worker starts (one batch), those at ``crashing_at`` crash it;
    returns (healthy, crashing, supervisor) once every study is REPORTED or FAILED."""
    studies = [add_study(h.registry, h.settings, index=first_index + i)[0] for i in range(size)]
    crashing = [studies[i] for i in crashing_at]
    healthy = [s for s in studies if s not in crashing]
    for study_id in studies:
        enqueue_report(h.registry, h.settings, study_id)
    supervisor = Supervisor(h, "w-crash", {**env, CRASH_IMAGES_ENV: crash_keys(h, crashing)})
    try:
        settled = {StudyState.REPORTED.value, StudyState.FAILED.value}
        try:
            h.wait_for(lambda: set(h.states(studies).values()) <= settled, "every study settled", timeout=WAIT_S)
        except BaseException:
            print(supervisor.logs())
            raise
    finally:
        supervisor.stop()
    return healthy, crashing, supervisor


def figures(h: Harness, study_ids: list[int], supervisor: Supervisor) -> str:
    """One line for docs/reliability.md: per death, seconds until the worker was back and until the next
    report was stored (by any study); the whole run's length."""
    with h.registry.session() as session:
        reported = sorted(
            (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
            for at in session.scalars(
                select(StudyEvent.at).where(
                    StudyEvent.study_id.in_(study_ids), StudyEvent.to_state == StudyState.REPORTED.value
                )
            )
        )
    starts = supervisor.started_at()
    back = [round(next((s for s in starts if s > died), float("nan")) - died, 1) for died in supervisor.died_at]
    next_report = [
        round(next((r for r in reported if r > died), float("nan")) - died, 1) for died in supervisor.died_at
    ]
    return (
        f"{len(study_ids)} studies, {len(supervisor.deaths)} worker deaths; worker back after {back} s; "
        f"next report after {next_report} s; first start to last report {reported[-1] - starts[0]:.0f} s"
    )


def check_outcome(
    h: Harness, healthy: list[int], crashing: list[int], supervisor: Supervisor, company_deaths: range = range(1, 2)
) -> None:
    states = h.states(healthy + crashing)
    outcome = {s: (states[s], j.attempts, j.error) for s, j in h.jobs(healthy + crashing).items()}
    expected = {**{s: "REPORTED" for s in healthy}, **{s: "FAILED" for s in crashing}}
    assert states == expected, f"crashing {crashing}, deaths {supervisor.deaths}: {outcome}"
    from workers.crashes import MAX_CRASHES

    assert h.report_counts(healthy + crashing) == {s: 1 for s in healthy}
    jobs = h.jobs(healthy + crashing)
    for study_id in healthy:  # reported; never charged an attempt for the crashes it was caught in
        job = jobs[study_id]
        assert job.attempts - job.lost_claims == 1 and job.crashes == 0 and job.isolated, vars(job)
    for study_id in crashing:
        job = jobs[study_id]
        assert job.crashes == MAX_CRASHES and job.state == "FAILED", vars(job)
        assert "worker process died" in (job.error or "") and "alone" in (job.error or "")
    # deaths in company (one per batch at most), then each crashing study dies alone MAX_CRASHES times;
    # every one a real segfault
    assert set(supervisor.deaths) == {-signal.SIGSEGV}, supervisor.deaths
    assert len(supervisor.deaths) - MAX_CRASHES * len(crashing) in company_deaths, supervisor.deaths


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [8, 4], ids=["one-batch-of-8", "two-batches-of-4-in-one-engine"])
def test_two_crashing_studies_among_eight_fail_alone_and_the_six_others_are_reported(
    crash_harness: Harness, batch_size: int
) -> None:
    """Batches of 4: the worker's two report threads (RADIALOG_REPORT_TASKS=2) each hand the engine a batch
    with one crashing study, and one segfault takes both batches' sequences down (or the second batch
    dies with its own crasher later: one or two deaths in company)."""
    h = crash_harness
    h.settings = h.settings.model_copy(update={"batch_size": batch_size})
    healthy, crashing, supervisor = run_crashing_batch(
        h, h.env(report_tasks=2), first_index=80, size=8, crashing_at=[2, 5]
    )
    check_outcome(h, healthy, crashing, supervisor, company_deaths=range(1, 8 // batch_size + 1))
    print(figures(h, healthy + crashing, supervisor))


@pytest.mark.slow
def test_a_crashing_study_fails_alone_with_the_embedded_broker(crash_harness: Harness) -> None:
    """The same attribution with kombu's SQLite transport (``radialog run`` without Redis): a dying worker
    loses the messages it held, and the registry's leases and the sweeper bring the jobs back."""
    h = crash_harness
    h.settings = embedded_broker(h.settings)
    env = h.env(broker_url=h.settings.broker_url, result_backend=h.settings.result_backend)
    healthy, crashing, supervisor = run_crashing_batch(h, env, first_index=90, size=3, crashing_at=[1])
    check_outcome(h, healthy, crashing, supervisor)
    print(figures(h, healthy + crashing, supervisor))
