"""Pipeline benchmark: generated chest X-rays through node -> queue -> worker -> stored report -> PACS.

    .venv/bin/python -m bench.pipeline [--n 10] [--mode sequential|burst] [--batch-wait-ms 200]
                                       [--batch-size 8] [--redis-db 13] [--json out.json]

Runs the DICOM node in this process (``dicom_node.server.start_node``, enqueue = ``enqueue_report``), one
``radialog worker`` subprocess with the tiny random checkpoint on CPU, a pynetdicom storage SCP standing
in for the PACS, the real Redis (its own database, flushed) and an SQLite registry. Each study is one
CR image sent with C-STORE.

``sequential`` sends a study, waits until its SR is accepted by the PACS, then sends the next: per-study
latency with no queue in front of it. ``burst`` sends all N at once: throughput and batch sizes.

Per study, from the registry (study_events, jobs.timings): the stable window is excluded by starting at
the STABLE event (the node's assembler tick). Stages: queue (STABLE -> the worker's claim: node's
selection + enqueue + broker), batch_wait (the worker collecting its batch), preprocess (DICOM -> 8-bit
image), model (classifier + generate as timed by the backend), store (SR + report row + outbox; the
REPORTED event is stamped inside it), export (REPORTED -> EXPORTED, the SR accepted by the PACS). Overhead = STABLE -> REPORTED
minus model time (target < 1 s), also given up to EXPORTED.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]


class Pacs:
    """A pynetdicom C-STORE SCP that accepts everything."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.count = 0
        self.ae = AE(ae_title="BENCHPACS")
        self.ae.supported_contexts = AllStoragePresentationContexts

        def on_store(_event: Any) -> int:
            self.count += 1
            return 0x0000

        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()


def send_study(port: int, index: int) -> str:
    """C-STORE one generated CR study to the node; returns its Study Instance UID."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    from radialog.synthetic import make_cxr

    ds = make_cxr(rows=512, cols=512, patient_index=index, seed=index)
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADIALOG")
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    try:
        status = assoc.send_c_store(ds)
        if not status or status.Status != 0x0000:
            raise RuntimeError(f"C-STORE failed: {status}")
    finally:
        assoc.release()
    return str(ds.StudyInstanceUID)


def study_figures(registry: Any, study_uid: str) -> dict[str, float] | None:
    """Stage seconds of one study, or None while it is not EXPORTED yet."""
    from radialog.registry import Job, Study, StudyEvent

    with registry.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None or study.state != "EXPORTED":
            return None
        events = {
            e.to_state: e.at
            for e in session.scalars(select(StudyEvent).where(StudyEvent.study_id == study.id).order_by(StudyEvent.id))
        }
        job = session.scalars(select(Job).where(Job.study_id == study.id)).one()
        timings = dict(job.timings)
        assert job.started_at is not None
        claimed = job.started_at
    stable, reported, exported = events["STABLE"], events["REPORTED"], events["EXPORTED"]
    model = (
        float(timings.get("classifier", 0.0)) + float(timings.get("vision", 0.0)) + float(timings.get("generate", 0.0))
    )
    preprocess, store = float(timings.get("preprocess", 0.0)), float(timings.get("store", 0.0))
    batch_wait = float(timings.get("batch_wait", 0.0))
    to_reported = (reported - stable).total_seconds()
    to_exported = (exported - stable).total_seconds()
    return {
        "queue": (claimed - stable).total_seconds(),
        "batch_wait": batch_wait,
        "preprocess": preprocess,
        "model": model,
        "store": store,
        "export": (exported - reported).total_seconds(),
        "stable_to_reported": to_reported,
        "stable_to_exported": to_exported,
        "overhead_to_reported": to_reported - model,
        "overhead_to_exported": to_exported - model,
        "batch_size": float(timings.get("batch_size", 1)),
    }


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dicom_node.server import start_node
    from radialog.registry import Registry
    from radialog.settings import Destination, Settings
    from workers.models.radialog_v2.tiny import make_tiny
    from radialog.messaging import enqueue_report
    from radialog.presence import ready_key

    tmp = Path(tempfile.mkdtemp(prefix="radialog-bench-pipeline-"))
    model_dir, base_dir = make_tiny(tmp / "tiny")
    broker = f"redis://127.0.0.1:6379/{args.redis_db}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    pacs = Pacs()
    settings = Settings(
        data_dir=tmp / "var",
        broker_url=broker,
        model_dir=model_dir,
        base_model_dir=base_dir,
        device="cpu",
        batch_size=args.batch_size,
        batch_wait_ms=args.batch_wait_ms,
        stable_after=args.stable_after,
        dicom_host="127.0.0.1",
        dicom_port=0,
        min_free_bytes=0,
        destinations=[Destination(name="pacs", ae_title="BENCHPACS", host="127.0.0.1", port=pacs.port)],
    )
    registry = Registry.from_settings(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
    env.update(
        {
            "RADIALOG_DATA_DIR": str(settings.data_dir),
            "RADIALOG_BROKER_URL": broker,
            "RADIALOG_MODEL_DIR": str(model_dir),
            "RADIALOG_BASE_MODEL_DIR": str(base_dir),
            "RADIALOG_DEVICE": "cpu",
            "RADIALOG_BATCH_SIZE": str(args.batch_size),
            "RADIALOG_BATCH_WAIT_MS": str(args.batch_wait_ms),
            "RADIALOG_DESTINATIONS": json.dumps([d.model_dump(mode="json") for d in settings.destinations]),
            "RADIALOG_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
    )
    log = tmp / "worker.log"
    with log.open("wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "composition.cli", "worker", "--hostname", "bench-worker", "--no-sweep"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    node = start_node(settings, registry, lambda study_id: enqueue_report(registry, settings, study_id))
    figures: list[dict[str, float]] = []
    try:
        wait_for(lambda: client.exists(ready_key("bench-worker")), 300, "worker ready", worker, log)
        time.sleep(1.0)  # the Celery consumer starts just after the readiness key
        started = time.monotonic()
        if args.mode == "sequential":
            for i in range(args.n):
                uid = send_study(node.port, i)
                figures.append(wait_for(lambda u=uid: study_figures(registry, u), 600, "study exported", worker, log))
        else:
            uids = [send_study(node.port, i) for i in range(args.n)]
            for uid in uids:
                figures.append(wait_for(lambda u=uid: study_figures(registry, u), 1800, "study exported", worker, log))
        wall = time.monotonic() - started
    finally:
        node.stop()
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        pacs.stop()
        registry.dispose()
        client.flushdb()
    keys = [k for k in figures[0] if k != "batch_size"]
    summary = {
        "mode": args.mode,
        "n": args.n,
        "batch_size": args.batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "wall_s": wall,
        "studies_per_s": args.n / wall,
        "batch_sizes": dict(Counter(int(f["batch_size"]) for f in figures)),
        "median": {k: statistics.median(f[k] for f in figures) for k in keys},
        "max": {k: max(f[k] for f in figures) for k in keys},
        "pacs_received": pacs.count,
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--mode", choices=("sequential", "burst"), default="sequential")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=int, default=200)
    parser.add_argument("--stable-after", type=float, default=1.0)
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--json", type=Path, default=None, help="Also write the summary here.")
    args = parser.parse_args()
    summary = run(args)
    print(
        f"{args.mode}: {args.n} studies, batch_size {args.batch_size}, batch_wait_ms {args.batch_wait_ms}: "
        f"{summary['studies_per_s']:.3f} studies/s, batch sizes {summary['batch_sizes']}"
    )
    print(f"{'stage':24} {'median s':>9} {'max s':>9}")
    for key, value in summary["median"].items():
        print(f"{key:24} {value:9.3f} {summary['max'][key]:9.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
