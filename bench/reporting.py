"""Reporting-stage benchmark: model output -> SR in the registry and on disk -> accepted by a real Orthanc.

For N synthetic studies (512x512 CR in the spool, registry on SQLite WAL or ``--db`` PostgreSQL) it times
``create_ai_draft`` (read the source header, build the highdicom SR, fsync'd write, Report + Export rows,
commit) and ``deliver`` (claim, C-STORE to Orthanc, record SENT, study EXPORTED). Model time is not part of
it. Prints median / p90 / max per stage in milliseconds.

    .venv/bin/python -m bench.reporting [--n 50] [--db postgresql+psycopg2://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.ingest import run_orthanc
from bench.seeding import PROVENANCE, add_study_without_history, model_output
from radialog.registry import Registry
from radialog.registry.db import temporary_schema
from radialog.settings import Destination, Settings
from reporting.export import deliver
from reporting.versions import create_ai_draft


def _summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return f"{name:<16} median {statistics.median(ms):7.1f} ms   p90 {p90:7.1f} ms   max {ms[-1]:7.1f} ms"


@contextmanager
def _database(url: str | None) -> Iterator[str | None]:
    """SQLite (None) as is; on PostgreSQL a schema of our own, dropped afterwards (leave `public` alone)."""
    if url is None or not url.startswith("postgresql"):
        yield url
        return
    with temporary_schema(url, prefix="bench") as schema_url:
        yield schema_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="studies")
    parser.add_argument(
        "--db",
        default=None,
        help="registry URL (default: SQLite in a temp directory; PostgreSQL gets a temporary schema)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, _database(args.db) as database_url:
        work = Path(tmp)
        (work / "orthanc").mkdir()
        with run_orthanc(work / "orthanc") as (pacs_aet, pacs_port):
            settings = Settings(
                data_dir=work / "var",
                database_url=database_url,
                min_free_bytes=0,
                destinations=[Destination(name="orthanc", ae_title=pacs_aet, host="127.0.0.1", port=pacs_port)],
            )
            registry = Registry.from_settings(settings)
            drafts: list[float] = []
            sends: list[float] = []
            for _ in range(args.n):
                study_id, _ = add_study_without_history(registry, settings)
                started = time.perf_counter()
                with registry.session() as session:
                    report = create_ai_draft(session, settings, study_id, model_output(study_id), PROVENANCE)
                    export_id = report.exports[0].id
                drafts.append(time.perf_counter() - started)
                started = time.perf_counter()
                outcome = deliver(registry, settings, export_id)
                sends.append(time.perf_counter() - started)
                if outcome != "SENT":
                    raise SystemExit(f"export {export_id}: {outcome}")
            registry.dispose()
            print(
                f"{args.n} studies, registry {settings.resolved_database_url.split('://')[0]}, Orthanc 1 association each"
            )
            print(_summary("create_ai_draft", drafts))
            print(_summary("deliver (C-STORE)", sends))
            print(_summary("total", [a + b for a, b in zip(drafts, sends, strict=True)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
