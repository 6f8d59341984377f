"""Process kills, a Redis restart and a PACS outage, through the whole chain as real processes.

    .venv/bin/python -m bench.faults [--per-phase 6] [--sqlite] [--keep] [--json out.json]

``composition.chain.Chain`` runs Orthanc (the PACS, with our router), ``radialog node``, ``radialog worker``
(tiny model, CPU) and ``radialog api`` on a private ``redis-server`` (no persistence: a restart comes back
empty, as the platform's default) and PostgreSQL (its own schema) or SQLite. Four phases, each sending
``--per-phase`` new studies (PA + lateral CR, two instances) into Orthanc with storescu:

1. node: kill -9 of ``radialog node`` as soon as it stored the phase's first instance (Orthanc is
   forwarding the rest), restarted at once; Orthanc's router retries what the node did not acknowledge.
2. worker: kill -9 of ``radialog worker`` as soon as a batch of the phase runs; a new worker starts
   (``--lease-seconds 5``); the lost claims come back through the lease and its sweeper (those that ran
   are re-run alone, see ``workers.crashes``).
3. redis: Redis down while the phase's studies arrive (the node's enqueues fail) and ``--outage-s`` more,
   then started again, empty; the worker reconnects and its sweeper re-sends what the broker lacks.
4. pacs: Orthanc (the PACS, and the router that forwards to the node) stopped once the node holds half
   the phase's instances, for ``--outage-s`` seconds: SR exports fail and the outbox retries; the
   router resumes its forwards after the restart.

Then every study must be EXPORTED with exactly one AI draft in the registry and exactly one SR in
Orthanc, and every instance Orthanc acknowledged must be in the node's registry exactly once. Prints one
line per phase and a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import func, select

from composition.chain import ORTHANC, Chain, ChainError, Process, free_port, wait_until
from radialog.messaging import QUEUES

PG_URL = os.environ.get("RADIALOG_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
PHASES = ("node", "worker", "redis", "pacs")


class PrivateRedis:
    """A redis-server on a free port without persistence; ``restart`` stops it and starts it empty."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        directory.mkdir(parents=True, exist_ok=True)
        self._argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        try:
            wait_until(lambda: _pings(client), 10, "redis-server")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def write_studies(directory: Path, first: int, count: int) -> list[tuple[str, list[Path]]]:
    """``count`` two-image chest studies (CR PA + lateral): (study uid, files)."""
    from radialog.synthetic import make_cxr

    directory.mkdir(parents=True, exist_ok=True)
    studies = []
    for i in range(first, first + count):
        pa = make_cxr(modality="CR", view_position="PA", patient_index=800000 + i, seed=i)
        lateral = make_cxr(
            modality="CR", view_position="LL", patient_index=800000 + i, seed=10_000 + i, study_uid=pa.StudyInstanceUID
        )
        files = []
        for ds in (pa, lateral):
            path = directory / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        studies.append((str(pa.StudyInstanceUID), files))
    return studies


class Faults:
    """The chain plus what the phases need: the registry, process kills and restarts."""

    def __init__(self, chain: Chain, database_url: str, broker: PrivateRedis) -> None:
        from radialog.registry import Registry

        self.chain = chain
        self.registry = Registry(database_url)
        self.broker = broker

    def process(self, name: str) -> Process:
        return next(p for p in self.chain.processes if p.name == name)

    def kill(self, name: str) -> None:
        """kill -9 of the process (its whole process group)."""
        proc = self.process(name)
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(30)
        self.chain.processes.remove(proc)

    def spawn(self, name: str, *args: str) -> Process:
        proc = Process(name, [sys.executable, "-m", "composition.cli", *args], self.chain.env, self.chain.workdir)
        self.chain.processes.append(proc)
        return proc

    def stop_orthanc(self) -> None:
        proc = self.process("orthanc")
        proc.stop()
        self.chain.processes.remove(proc)

    def start_orthanc(self) -> None:
        proc = Process(
            "orthanc", [str(ORTHANC), str(self.chain.workdir / "orthanc.json")], self.chain.env, self.chain.workdir
        )
        self.chain.processes.append(proc)
        wait_until(self._orthanc_answers, 60, "Orthanc back", proc.check)

    def _orthanc_answers(self) -> bool:
        try:
            return httpx.get(f"{self.chain.orthanc_url}/system", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    # -- registry views --------------------------------------------------------------------------
    def stored_instances(self, uids: list[str]) -> int:
        from radialog.registry import Instance, Study

        with self.registry.session() as session:
            return int(
                session.scalar(
                    select(func.count(Instance.id))
                    .join(Study, Instance.study_id == Study.id)
                    .where(Study.study_instance_uid.in_(uids))
                )
                or 0
            )

    def job_states(self, uids: list[str]) -> list[str]:
        from radialog.registry import Job, Study

        with self.registry.session() as session:
            return list(
                session.scalars(
                    select(Job.state).join(Study, Job.study_id == Study.id).where(Study.study_instance_uid.in_(uids))
                )
            )

    def run_modes(self, uids: list[str]) -> list[str | None]:
        from radialog.registry import Job, Study

        with self.registry.session() as session:
            return list(
                session.scalars(
                    select(Job.run_mode)
                    .join(Study, Job.study_id == Study.id)
                    .where(Study.study_instance_uid.in_(uids), Job.state == "RUNNING")
                )
            )

    def job_figures(self, uids: list[str]) -> dict[str, int]:
        """Jobs re-run alone after a lost worker, claims lost with it, exports that needed a retry."""
        from radialog.registry import Export, Job, Report, Study

        with self.registry.session() as session:
            jobs = session.scalars(
                select(Job).join(Study, Job.study_id == Study.id).where(Study.study_instance_uid.in_(uids))
            ).all()
            retried = session.scalar(
                select(func.count(Export.id))
                .join(Report, Export.report_id == Report.id)
                .join(Study, Report.study_id == Study.id)
                .where(Study.study_instance_uid.in_(uids), Export.attempts > 1)
            )
            return {
                "jobs_rerun_alone": sum(j.isolated for j in jobs),
                "claims_lost": sum(j.lost_claims for j in jobs),
                "exports_retried": int(retried or 0),
            }

    def study_rows(self, uids: list[str]) -> dict[str, tuple[str, int, int]]:
        """uid -> (state, instances, AI drafts) from the registry."""
        from radialog.registry import Instance, Report, Study

        with self.registry.session() as session:
            rows = {}
            for study in session.scalars(select(Study).where(Study.study_instance_uid.in_(uids))):
                instances = session.scalar(select(func.count(Instance.id)).where(Instance.study_id == study.id))
                drafts = session.scalar(
                    select(func.count(Report.id)).where(Report.study_id == study.id, Report.kind == "ai_draft")
                )
                rows[study.study_instance_uid] = (study.state, int(instances or 0), int(drafts or 0))
            return rows


def send(chain: Chain, studies: list[tuple[str, list[Path]]]) -> int:
    """storescu into Orthanc, one association per study; returns the instances Orthanc acknowledged."""
    acknowledged = 0
    for _uid, files in studies:
        result = chain.storescu(files)
        if result.returncode != 0:
            raise ChainError(f"storescu into Orthanc failed: {result.stderr[-500:]}")
        acknowledged += len(files)
    return acknowledged


def run_phase(faults: Faults, phase: str, studies: list[tuple[str, list[Path]]], outage_s: float) -> dict[str, Any]:
    chain = faults.chain
    uids = [uid for uid, _ in studies]
    started = time.monotonic()
    detail: dict[str, Any] = {}
    if phase == "redis":  # down before the studies come: the node's enqueues fail, the queue is lost
        faults.broker.stop()
    acknowledged = send(chain, studies)
    if phase == "node":
        wait_until(lambda: faults.stored_instances(uids) >= 1, 120, "the node's first instance", chain.check_alive)
        faults.kill("node")
        detail["stored_when_killed"] = faults.stored_instances(uids)
        faults.spawn("node", "node")
    elif phase == "worker":
        wait_until(lambda: "batch" in faults.run_modes(uids), 300, "a batch running", chain.check_alive)
        faults.kill("worker")
        detail["jobs_when_killed"] = sorted(faults.job_states(uids))
        faults.spawn(
            "worker", "worker", "--queues", ",".join(QUEUES), "--hostname", chain.worker_name, "--lease-seconds", "5"
        )
    elif phase == "redis":
        wait_until(lambda: len(faults.job_states(uids)) == len(uids), 300, "every job queued", chain.check_alive)
        time.sleep(outage_s)
        detail["jobs_when_redis_came_back"] = sorted(faults.job_states(uids))
        faults.broker.start()  # empty: nothing of what was sent before it stopped
    elif phase == "pacs":
        wait_until(
            lambda: faults.stored_instances(uids) >= acknowledged // 2,
            300,
            "half the instances at the node",
            chain.check_alive,
        )
        faults.stop_orthanc()
        detail["stored_when_pacs_stopped"] = faults.stored_instances(uids)
        time.sleep(outage_s)  # the outage itself: reports are made and their exports fail meanwhile
        detail["exported_during_outage"] = sum(1 for s, _i, _d in faults.study_rows(uids).values() if s == "EXPORTED")
        faults.start_orthanc()
    wait_until(
        lambda: (
            all(s == "EXPORTED" for s, _i, _d in faults.study_rows(uids).values())
            and len(faults.study_rows(uids)) == len(uids)
        ),
        900,
        f"phase {phase}: every study exported",
        chain.check_alive,
    )
    rows = faults.study_rows(uids)
    srs = {uid: len(chain.orthanc_srs(uid)) for uid in uids}
    detail.update(faults.job_figures(uids))
    return {
        "phase": phase,
        "studies": len(uids),
        "instances_acknowledged": acknowledged,
        "instances_stored": sum(i for _s, i, _d in rows.values()),
        "studies_exported": sum(1 for s, _i, _d in rows.values() if s == "EXPORTED"),
        "ai_drafts_per_study": sorted({d for _s, _i, d in rows.values()}),
        "srs_in_pacs_per_study": sorted(set(srs.values())),
        "seconds": round(time.monotonic() - started, 1),
        **detail,
    }


def run(per_phase: int, use_sqlite: bool, keep: bool, outage_s: float) -> dict[str, Any]:
    from bench.e2e import pg_schema
    from workers.models.radialog_v2.tiny import make_tiny

    workdir = Path(tempfile.mkdtemp(prefix="radialog-bench-faults-"))
    model_dir, base_dir = make_tiny(workdir / "model")
    results = []
    with contextlib.ExitStack() as stack:
        broker = PrivateRedis(workdir / "redis").start()
        stack.callback(broker.stop)
        database_url = None if use_sqlite else stack.enter_context(pg_schema())
        chain = stack.enter_context(
            Chain(
                workdir / "chain",
                database_url=database_url,
                redis_url=broker.url,
                model_dir=model_dir,
                base_model_dir=base_dir,
            )
        )
        faults = Faults(chain, database_url or chain.env_sqlite_url(), broker)
        try:
            for n, phase in enumerate(PHASES):
                studies = write_studies(workdir / "studies" / phase, n * per_phase, per_phase)
                result = run_phase(faults, phase, studies, outage_s)
                print(json.dumps(result), flush=True)
                results.append(result)
        except BaseException:
            print(chain.logs(), file=sys.stderr)
            raise
        finally:
            faults.registry.dispose()
    if keep:
        print(f"kept {workdir}", file=sys.stderr)
    return {"per_phase": per_phase, "registry": "sqlite" if use_sqlite else "postgresql", "phases": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-phase", type=int, default=6, help="studies sent in each phase")
    parser.add_argument("--outage-s", type=float, default=20.0, help="how long the PACS is down")
    parser.add_argument("--sqlite", action="store_true", help="SQLite registry instead of PostgreSQL")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    summary = run(args.per_phase, args.sqlite, args.keep, args.outage_s)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
