"""The whole product chain on one machine, as real processes: Orthanc with our router, then the node,
worker and API (or `radialog run` doing all three), configured only through RADIALOG_* variables.

Used by `radialog demo`, by the end-to-end tests and by bench/e2e.py, so the demo a hospital tries first
is the same topology the tests prove. Orthanc comes from Debian's packages (orthanc, orthanc-python); the
router script is deploy/orthanc/radialog_router.py in the source tree.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[1]  # the source tree (deploy/ lives here)
ORTHANC = Path("/usr/sbin/Orthanc")
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
ROUTER = ROOT / "deploy" / "orthanc" / "radialog_router.py"
NODE_AET, PACS_AET, MODALITY_AET, PROBE_AET = "RADIALOG", "ORTHANC", "XRAY1", "E2EPROBE"
T = TypeVar("T")


def orthanc_available() -> bool:
    """Debian's Orthanc and its Python plugin (which runs our router) are installed."""
    return ORTHANC.exists() and PYTHON_PLUGIN.exists() and ROUTER.exists()


class ChainError(RuntimeError):
    """A process of the chain did not start or died; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | None], timeout: float, what: str, check: Callable[[], None] | None = None
) -> T:
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
        model_dir: Path | None = None,
        base_model_dir: Path | None = None,
        orthanc_stable_age: int = 1,
        stable_after: float = 0.5,
        extra_env: dict[str, str] | None = None,
        single_process: bool = False,
        with_orthanc: bool = True,
        flush_redis: bool = True,
    ) -> None:
        """``single_process`` runs `radialog run` (node + worker + API in one process, embedded broker
        when Redis does not answer) instead of three processes; ``with_orthanc=False`` leaves the PACS out
        (studies go straight to the node, SRs stay in the spool); ``flush_redis`` empties the Redis
        database first (tests own theirs; the demo never flushes). ``model_dir`` / ``base_model_dir`` are
        RaDialog v2's; another backend's settings come in ``extra_env`` (e.g. XrayGPT's ``TinyPaths.env()``)."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.single_process = single_process
        self.with_orthanc = with_orthanc
        self.flush_redis = flush_redis
        self.orthanc_stable_age = orthanc_stable_age
        self.stable_after = stable_after
        self.orthanc_http, self.orthanc_dicom = free_port(), free_port()
        self.node_port, self.api_port = free_port(), free_port()
        self.worker_name = f"e2e-{uuid.uuid4().hex[:6]}@chain"
        self.orthanc_url = f"http://127.0.0.1:{self.orthanc_http}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.processes: list[Process] = []
        self.api_key = ""
        self.user = f"radiologist-{uuid.uuid4().hex[:6]}"  # unique: a configured registry may outlive runs
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
        self.env = {
            **clean,
            "RADIALOG_DATA_DIR": str(workdir / "var"),
            "RADIALOG_BROKER_URL": redis_url,
            "RADIALOG_AE_TITLE": NODE_AET,
            "RADIALOG_DICOM_HOST": "127.0.0.1",
            "RADIALOG_DICOM_PORT": str(self.node_port),
            "RADIALOG_ALLOWED_CALLING_AETS": json.dumps(
                [PACS_AET, PROBE_AET] + ([] if with_orthanc else [MODALITY_AET])
            ),
            "RADIALOG_ALLOWED_ADDRESSES": json.dumps(["127.0.0.1"]),
            "RADIALOG_STABLE_AFTER": str(stable_after),
            "RADIALOG_MIN_FREE_BYTES": "0",
            "RADIALOG_DESTINATIONS": json.dumps(
                [{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": self.orthanc_dicom}]
                if with_orthanc
                else []
            ),
            "RADIALOG_EXPORT_BACKOFF_INITIAL": "0.5",
            "RADIALOG_EXPORT_BACKOFF_MAX": "2",
            **({"RADIALOG_MODEL_DIR": str(model_dir)} if model_dir else {}),
            **({"RADIALOG_BASE_MODEL_DIR": str(base_model_dir)} if base_model_dir else {}),
            "RADIALOG_DEVICE": "cpu",
            "RADIALOG_BATCH_WAIT_MS": "50",
            "RADIALOG_API_HOST": "127.0.0.1",
            "RADIALOG_API_PORT": str(self.api_port),
            **({"RADIALOG_DATABASE_URL": database_url} if database_url else {}),
            **(extra_env or {}),
        }

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, worker_timeout: float = 300.0) -> Self:
        if self.with_orthanc and not orthanc_available():
            raise ChainError("needs Debian's orthanc and orthanc-python packages")
        if self.flush_redis and self._redis_answers():  # no Redis: `radialog run` uses its embedded broker
            self._flush_redis()
        if self.with_orthanc:
            self._start_orthanc()
        self._radialog("db", "upgrade")
        self.api_key = self._radialog("users", "create", self.user, "--role", "radiologist").strip()
        if self.single_process:
            everything = self._spawn("run", "run")
            wait_until(self._node_echoes, 120, "the node to answer C-ECHO", everything.check)
            wait_until(self._api_healthy, 60, "the API", everything.check)
            # /readyz sees the worker with either broker (Redis, or the embedded one without it)
            wait_until(self._api_ready, worker_timeout, "the worker's model", everything.check)
            return self
        from radialog.messaging import QUEUES

        node = self._spawn("node", "node")
        wait_until(self._node_echoes, 60, "the node to answer C-ECHO", node.check)
        worker = self._spawn("worker", "worker", "--queues", ",".join(QUEUES), "--hostname", self.worker_name)
        api = self._spawn("api", "api")
        wait_until(self._api_healthy, 60, "the API", api.check)
        wait_until(self._worker_ready, worker_timeout, "the worker's model", worker.check)
        return self

    def create_user(self, name: str, role: str) -> str:
        """A new API user of the chain's registry; returns its key."""
        return self._radialog("users", "create", name, "--role", role).strip()

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
        process = Process(name, [sys.executable, "-m", "composition.cli", *args], self.env, self.workdir)
        self.processes.append(process)
        return process

    def _radialog(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "composition.cli", *args],
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
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import by pynetdicom

        try:  # a plain connect first: pynetdicom logs every refused association as an error
            socket.create_connection(("127.0.0.1", self.node_port), timeout=1).close()
        except OSError:
            return False
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

    def _api_ready(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def _redis_answers(self) -> bool:
        from radialog.messaging import redis_answers

        return redis_answers(self.redis_url)

    def _worker_ready(self) -> bool:
        from radialog.messaging import connect_redis
        from radialog.presence import ready_key

        client = connect_redis(self.redis_url)
        try:
            return bool(client.exists(ready_key(self.worker_name)))
        finally:
            client.close()

    # -- driving it -----------------------------------------------------------------------------
    def storescu(
        self, files: list[Path], *, port: int | None = None, called: str = PACS_AET
    ) -> subprocess.CompletedProcess[str]:
        """Send files with dcmtk's storescu, as a modality would (to Orthanc when it runs, else to the node)."""
        if not self.with_orthanc and port is None:
            port, called = self.node_port, NODE_AET
        return subprocess.run(
            [
                "storescu",
                "-aet",
                MODALITY_AET if called == PACS_AET or not self.with_orthanc else PROBE_AET,
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
