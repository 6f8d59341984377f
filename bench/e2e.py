"""The whole chain as real processes, and its end-to-end benchmark.

``composition.chain.Chain`` starts, on free ports: Debian's Orthanc with the deployment's router (deploy/orthanc/), then
``radialog db upgrade``, ``radialog node``, ``radialog worker`` (tiny model unless told otherwise) and
``radialog api`` as subprocesses configured only through RADIALOG_* variables, on the real Redis (its own
database number) and PostgreSQL (its own schema) or SQLite. tests/test_e2e.py drives it; so does this
benchmark:

    .venv/bin/python -m bench.e2e [--n 50] [--sequential] [--redis-db 15] [--sqlite] [--keep]
                                  [--stable-after 0.5] [--trusted-router] [--redis HOST:PORT]

``--trusted-router`` marks Orthanc (the router plugin, which forwards whole studies in one association) as a
trusted router (``RADIALOG_TRUSTED_ROUTERS``): the node completes its studies when the association is
released instead of after ``--stable-after`` seconds without a new instance. Run the same command with and
without it to see what the quiet window costs.

It sends N single-image chest studies into Orthanc with storescu (all at once, or with --sequential one
after the other's SR) and measures, per study, from storescu's end until Orthanc accepted the SR (the
export's sent_at), split in stages (medians): Orthanc stable wait + forward, node (first instance ->
QUEUED), queue wait, worker (RUNNING -> REPORTED) with the model's own time (classifier + generate) inside,
export (REPORTED -> accepted). "Pipeline overhead" = STABLE -> SR accepted minus model time (the design's
target), also without the queue wait (time spent behind other studies' model time is capacity, not
overhead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from composition.chain import Chain, ChainError, wait_until

PG_URL = os.environ.get("RADIALOG_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema on the test server; yields a SQLAlchemy URL that uses it."""
    from radialog.registry.db import temporary_schema

    with temporary_schema(PG_URL, prefix="e2e") as url:
        yield url


# -- the benchmark --------------------------------------------------------------------------------
def _write_studies(n: int, directory: Path) -> list[tuple[str, str, Path]]:
    """N single-image chest studies (CR PA 512x512): (accession, study uid, path)."""
    from radialog.synthetic import make_cxr

    directory.mkdir(parents=True, exist_ok=True)
    studies = []
    for i in range(n):
        ds = make_cxr(modality="CR", view_position="PA", patient_index=700000 + i, seed=i)
        path = directory / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        studies.append((str(ds.AccessionNumber), str(ds.StudyInstanceUID), path))
    return studies


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_benchmark(
    n: int,
    redis_db: int,
    use_sqlite: bool,
    keep: bool,
    sequential: bool = False,
    *,
    stable_after: float = 0.5,
    trusted_router: bool = False,
    redis: str = "127.0.0.1:6379",
) -> dict[str, Any]:
    from workers.models.radialog_v2.tiny import make_tiny

    workdir = Path(tempfile.mkdtemp(prefix="radialog-e2e-bench-"))
    model_dir, base_dir = make_tiny(workdir / "model")
    studies = _write_studies(n, workdir / "studies")
    with contextlib.ExitStack() as stack:
        database_url = None if use_sqlite else stack.enter_context(pg_schema())
        chain = stack.enter_context(
            Chain(
                workdir / "chain",
                database_url=database_url,
                redis_url=f"redis://{redis}/{redis_db}",
                model_dir=model_dir,
                base_model_dir=base_dir,
                stable_after=stable_after,
                extra_env={"RADIALOG_TRUSTED_ROUTERS": json.dumps(["ORTHANC"])} if trusted_router else None,
            )
        )
        sent_at: dict[str, float] = {}
        started = time.time()
        for accession, uid, path in studies:  # one association per study, as modalities do
            result = chain.storescu([path])
            if result.returncode != 0:
                raise ChainError(f"storescu failed: {result.stderr[-500:]}")
            sent_at[accession] = time.time()
            if sequential:  # no queueing behind other studies: the pipeline's own latency
                wait_until(lambda uid=uid: chain.orthanc_srs(uid), 900, f"the SR of {accession}", chain.check_alive)
        for accession, uid, _path in studies:
            wait_until(lambda uid=uid: chain.orthanc_srs(uid), 900, f"the SR of {accession}", chain.check_alive)
        wall = time.time() - started
        rows = _stage_rows(database_url or chain.env_sqlite_url(), studies, sent_at)
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        summary = _summarise(rows, chain)
    summary.update(
        n=n,
        mode="sequential" if sequential else "all at once",
        stable_after_s=stable_after,
        trusted_router=trusted_router,
        wall_s=round(wall, 1),
        registry="sqlite" if use_sqlite else "postgresql",
    )
    return summary


def _ts(value: datetime | None) -> float:
    """A registry timestamp (aware UTC: ``UTCDateTime``) as seconds since the epoch."""
    assert value is not None
    return value.timestamp()


def _stage_rows(database_url: str, studies: list[tuple[str, str, Path]], sent_at: dict[str, float]) -> list[dict]:
    """Per study: stage durations in seconds, from the registry's own timestamps."""
    from sqlalchemy import select

    from radialog.registry import Job, Registry, Report, Study

    registry = Registry(database_url)
    rows = []
    try:
        with registry.session() as session:
            for accession, uid, _path in studies:
                study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
                events = {e.to_state: _ts(e.at) for e in study.events}
                job = session.scalar(select(Job).where(Job.study_id == study.id))
                report = session.scalar(select(Report).where(Report.study_id == study.id, Report.version == 1))
                accepted = min(_ts(e.sent_at) for e in report.exports if e.sent_at is not None)
                received = min(_ts(i.received_at) for i in study.instances)
                timings = job.timings or {}
                model = float(timings.get("classifier", 0.0)) + float(timings.get("generate", 0.0))
                rows.append(
                    {
                        "orthanc_to_node": received - sent_at[accession],
                        "node_to_queued": events["QUEUED"] - received,
                        "last_image_to_sr_in_orthanc": accepted - max(_ts(i.received_at) for i in study.instances),
                        "queue_wait": events["RUNNING"] - events["QUEUED"],
                        "worker": events["REPORTED"] - events["RUNNING"],
                        "preprocess": float(timings.get("preprocess", 0.0)),
                        "model": model,
                        "sr_store": float(timings.get("store", 0.0)),
                        "export": accepted - events["REPORTED"],
                        "stable_to_accepted": accepted - events["STABLE"],
                        "end_to_end": accepted - sent_at[accession],
                        "batch_size": timings.get("batch_size"),
                    }
                )
    finally:
        registry.dispose()
    return rows


def _summarise(rows: list[dict], chain: Chain) -> dict[str, Any]:
    stages = [k for k in rows[0] if k != "batch_size"]
    medians = {stage: round(_median([r[stage] for r in rows]), 3) for stage in stages}
    waits = chain.orthanc_stable_age + chain.stable_after
    return {
        "medians_s": medians,
        "pipeline_overhead_median_s": round(_median([r["stable_to_accepted"] - r["model"] for r in rows]), 3),
        "pipeline_overhead_excl_queue_wait_median_s": round(
            _median([r["stable_to_accepted"] - r["model"] - r["queue_wait"] for r in rows]), 3
        ),
        "overhead_beyond_model_and_waits_median_s": round(
            _median([r["end_to_end"] - r["model"] - waits for r in rows]), 3
        ),
        "stability_waits_s": waits,
        "batch_sizes": sorted({r["batch_size"] for r in rows}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--redis-db", type=int, default=15)
    parser.add_argument("--sqlite", action="store_true", help="SQLite registry instead of PostgreSQL")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--sequential", action="store_true", help="send the next study only after the last SR")
    parser.add_argument("--stable-after", type=float, default=0.5, help="the node's quiet window (s)")
    parser.add_argument(
        "--trusted-router", action="store_true", help="Orthanc's router is trusted: complete on association release"
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("RADIALOG_TEST_REDIS", "127.0.0.1:6379"),
        help="Redis host:port (default RADIALOG_TEST_REDIS, else 127.0.0.1:6379)",
    )
    args = parser.parse_args()
    result = run_benchmark(
        args.n,
        args.redis_db,
        args.sqlite,
        args.keep,
        args.sequential,
        stable_after=args.stable_after,
        trusted_router=args.trusted_router,
        redis=args.redis,
    )
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
