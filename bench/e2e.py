"""The whole chain as real processes, and its end-to-end benchmark.

``Chain`` starts, on free ports: Debian's Orthanc with the deployment's router (deploy/orthanc/), then
``radialog db upgrade``, ``radialog node``, ``radialog worker`` (tiny model unless told otherwise) and
``radialog api`` as subprocesses configured only through RADIALOG_* variables, on the real Redis (its own
database number) and PostgreSQL (its own schema) or SQLite. tests/test_e2e.py drives it; so does this
benchmark:

    .venv/bin/python -m bench.e2e [--n 50] [--sequential] [--redis-db 15] [--sqlite] [--keep]

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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = Path("/usr/sbin/Orthanc")
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
ROUTER = ROOT / "deploy" / "orthanc" / "radialog_router.py"
PG_URL = os.environ.get("RADIALOG_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
NODE_AET, PACS_AET, MODALITY_AET, PROBE_AET = "RADIALOG", "ORTHANC", "XRAY1", "E2EPROBE"
T = TypeVar("T")


class ChainError(RuntimeError):
    """A process of the chain did not start or died; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float, what: str, check: Callable[[], None] | None = None) -> T:
    """Poll ``predicate`` until truthy; ``check`` raises when a process we wait on has died."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema on the test server; yields a SQLAlchemy URL that uses it."""
    from sqlalchemy import create_engine, text

    schema = f"e2e_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class Process:
    """One subprocess with its log file; stopped with SIGTERM (then SIGKILL) in its own process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise ChainError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 30.0) -> None:
        if self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


class Chain:
    """Orthanc -> node -> worker -> Orthanc, plus the API, as separate processes (see module docstring)."""

    def __init__(
        self,
        workdir: Path,
        *,
        database_url: str | None,
        redis_url: str,
        model_dir: Path,
        base_model_dir: Path,
        orthanc_stable_age: int = 1,
        stable_after: float = 0.5,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.orthanc_stable_age = orthanc_stable_age
        self.stable_after = stable_after
        self.orthanc_http, self.orthanc_dicom = free_port(), free_port()
        self.node_port, self.api_port = free_port(), free_port()
        self.worker_name = f"e2e-{uuid.uuid4().hex[:6]}@chain"
        self.orthanc_url = f"http://127.0.0.1:{self.orthanc_http}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.processes: list[Process] = []
        self.api_key = ""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
        self.env = {
            **clean,
            "RADIALOG_DATA_DIR": str(workdir / "var"),
            "RADIALOG_BROKER_URL": redis_url,
            "RADIALOG_AE_TITLE": NODE_AET,
            "RADIALOG_DICOM_HOST": "127.0.0.1",
            "RADIALOG_DICOM_PORT": str(self.node_port),
            "RADIALOG_ALLOWED_CALLING_AETS": json.dumps([PACS_AET, PROBE_AET]),
            "RADIALOG_ALLOWED_ADDRESSES": json.dumps(["127.0.0.1"]),
            "RADIALOG_STABLE_AFTER": str(stable_after),
            "RADIALOG_MIN_FREE_BYTES": "0",
            "RADIALOG_DESTINATIONS": json.dumps(
                [{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": self.orthanc_dicom}]
            ),
            "RADIALOG_EXPORT_BACKOFF_INITIAL": "0.5",
            "RADIALOG_EXPORT_BACKOFF_MAX": "2",
            "RADIALOG_MODEL_DIR": str(model_dir),
            "RADIALOG_BASE_MODEL_DIR": str(base_model_dir),
            "RADIALOG_DEVICE": "cpu",
            "RADIALOG_BATCH_WAIT_MS": "50",
            "RADIALOG_API_HOST": "127.0.0.1",
            "RADIALOG_API_PORT": str(self.api_port),
            **({"RADIALOG_DATABASE_URL": database_url} if database_url else {}),
            **(extra_env or {}),
        }

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, worker_timeout: float = 300.0) -> Self:
        if not ORTHANC.exists() or not PYTHON_PLUGIN.exists():
            raise ChainError("needs Debian's orthanc and orthanc-python packages")
        self._flush_redis()
        self._start_orthanc()
        self._radialog("db", "upgrade")
        self.api_key = self._radialog("users", "create", "e2e-radiologist", "--role", "radiologist").strip()
        node = self._spawn("node", "node")
        wait_until(self._node_echoes, 60, "the node to answer C-ECHO", node.check)
        worker = self._spawn("worker", "worker", "--queues", "dialog,export,report", "--hostname", self.worker_name)
        api = self._spawn("api", "api")
        wait_until(self._api_healthy, 60, "the API", api.check)
        wait_until(self._worker_ready, worker_timeout, "the worker's model", worker.check)
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        for process in self.processes:
            process.check()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(2000)}" for p in self.processes)

    def env_sqlite_url(self) -> str:
        """The registry URL the processes use when no RADIALOG_DATABASE_URL was given."""
        return f"sqlite:///{(Path(self.env['RADIALOG_DATA_DIR']) / 'registry.sqlite').resolve()}"

    def _spawn(self, name: str, *args: str) -> Process:
        process = Process(name, [sys.executable, "-m", "radialog.cli", *args], self.env, self.workdir)
        self.processes.append(process)
        return process

    def _radialog(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "radialog.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise ChainError(f"radialog {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def _flush_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            client.flushdb()  # our own database number only
        finally:
            client.close()

    def _start_orthanc(self) -> None:
        shipped = json.loads((ROUTER.parent / "orthanc.json").read_text())
        config = {
            **shipped,
            "Name": "radialog-e2e-pacs",
            "StorageDirectory": str(self.workdir / "orthanc"),
            "IndexDirectory": str(self.workdir / "orthanc"),
            "HttpPort": self.orthanc_http,
            "DicomPort": self.orthanc_dicom,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": self.orthanc_stable_age,
            "PythonScript": str(ROUTER),
            "DicomModalities": {
                "radialog": {"AET": NODE_AET, "Host": "127.0.0.1", "Port": self.node_port},
                "xray1": {"AET": MODALITY_AET, "Host": "127.0.0.1", "Port": 104},
            },
            "RadialogRouter": {**shipped["RadialogRouter"], "RetryInterval": 1, "CheckInterval": 0.2},
        }
        config.pop("RegisteredUsers", None)
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        orthanc = Process("orthanc", [str(ORTHANC), str(path)], self.env, self.workdir)
        self.processes.append(orthanc)
        wait_until(self._orthanc_up, 30, "Orthanc", orthanc.check)

    # -- readiness probes -----------------------------------------------------------------------
    def _orthanc_up(self) -> bool:
        try:
            return httpx.get(f"{self.orthanc_url}/system", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def _node_echoes(self) -> bool:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=PROBE_AET)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 2
        assoc = ae.associate("127.0.0.1", self.node_port, ae_title=NODE_AET)
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return getattr(status, "Status", None) == 0x0000

    def _api_healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def _worker_ready(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            return bool(client.exists(f"radialog:worker:{self.worker_name}"))
        finally:
            client.close()

    # -- driving it -----------------------------------------------------------------------------
    def storescu(
        self, files: list[Path], *, port: int | None = None, called: str = PACS_AET
    ) -> subprocess.CompletedProcess[str]:
        """Send files with dcmtk's storescu, as a modality would (to Orthanc unless told otherwise)."""
        return subprocess.run(
            [
                "storescu",
                "-aet",
                MODALITY_AET if called == PACS_AET else PROBE_AET,
                "-aec",
                called,
                "127.0.0.1",
                str(port or self.orthanc_dicom),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.request(method, f"{self.api_url}{path}", headers=headers, timeout=180, **kwargs)

    def study_by_accession(self, accession: str) -> dict[str, Any] | None:
        response = self.api("GET", "/api/v1/studies", params={"accession": accession})
        response.raise_for_status()
        items = response.json()["items"]
        return items[0] if items else None

    def wait_state(self, accession: str, states: set[str], timeout: float = 180) -> dict[str, Any]:
        """Wait until the study with this accession number is in one of ``states``."""

        def reached() -> dict[str, Any] | None:
            study = self.study_by_accession(accession)
            return study if study and study["state"] in states else None

        return wait_until(reached, timeout, f"study {accession} to reach {sorted(states)}", self.check_alive)

    def orthanc(self, path: str) -> Any:
        response = httpx.get(f"{self.orthanc_url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def orthanc_srs(self, study_uid: str) -> list[dict[str, Any]]:
        """The SR instances Orthanc holds in this study (simplified tags, Orthanc id under 'ID')."""
        found = [x for x in self.orthanc_post("/tools/lookup", study_uid) if x["Type"] == "Study"]
        if not found:
            return []
        srs = []
        for series in self.orthanc(f"/studies/{found[0]['ID']}/series"):
            if series["MainDicomTags"].get("Modality") == "SR":
                for instance in series["Instances"]:
                    srs.append({"ID": instance, **self.orthanc(f"/instances/{instance}/simplified-tags")})
        return srs

    def orthanc_post(self, path: str, body: str) -> Any:
        response = httpx.post(f"{self.orthanc_url}{path}", content=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def orthanc_file(self, instance_id: str) -> bytes:
        response = httpx.get(f"{self.orthanc_url}/instances/{instance_id}/file", timeout=30)
        response.raise_for_status()
        return response.content


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


def run_benchmark(n: int, redis_db: int, use_sqlite: bool, keep: bool, sequential: bool = False) -> dict[str, Any]:
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
                redis_url=f"redis://127.0.0.1:6379/{redis_db}",
                model_dir=model_dir,
                base_model_dir=base_dir,
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
        wall_s=round(wall, 1),
        registry="sqlite" if use_sqlite else "postgresql",
    )
    return summary


def _ts(value: datetime | None) -> float:
    """Registry timestamps are UTC; SQLite hands them back naive."""
    assert value is not None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


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
    args = parser.parse_args()
    result = run_benchmark(args.n, args.redis_db, args.sqlite, args.keep, args.sequential)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
