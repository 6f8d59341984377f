"""A real Orthanc (/usr/sbin/Orthanc) for tests: temp config on free ports, start / stop / restart, REST helpers.

Usage::

    with OrthancServer(tmp_path / "orthanc") as pacs:              # or the ``orthanc`` fixture below
        pacs.upload(path)                                          # REST POST /instances
        pacs.study_series(study_uid)                               # series of a study, by Study Instance UID
        pacs.stop(); pacs.start()                                  # PACS down / up again: same ports, same storage

``OrthancServer(directory, config, python_script=...)`` (alias ``OrthancProcess``; ``extra_config=`` is
the same as ``config``) merges ``config`` into the base test config; ``python_script`` loads Debian's
Python plugin with that script. Orthanc 1.10 listens on all interfaces (it cannot
be told otherwise); remote access and authentication are off, storage is in the given directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import pytest

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
AE_TITLE = "ORTHANC"
T = TypeVar("T")


def free_port() -> int:
    """A TCP port nobody listens on right now (bind port 0, then release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_orthanc(python_plugin: bool = False) -> None:
    """Skip the test when Orthanc (or its Python plugin) is not installed on this machine."""
    if not ORTHANC_BINARY.exists():
        pytest.skip("Orthanc is not installed")
    if python_plugin and not PYTHON_PLUGIN.exists():
        pytest.skip("Orthanc's Python plugin is not installed")


def wait_for(predicate: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class OrthancServer:
    """One Orthanc server process with its own storage, restartable on the same ports."""

    def __init__(
        self,
        directory: Path,
        config: dict[str, Any] | None = None,
        *,
        extra_config: dict[str, Any] | None = None,
        python_script: Path | None = None,
        aet: str = AE_TITLE,
    ) -> None:
        require_orthanc(python_plugin=python_script is not None)
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config_path = directory / "orthanc.json"
        base: dict[str, Any] = {
            "Name": "radialog-test",
            "StorageDirectory": str(directory / "storage"),
            "IndexDirectory": str(directory / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": 1,
            "Plugins": [],
        }
        if python_script is not None:
            base.update(Plugins=[str(PYTHON_PLUGIN)], PythonScript=str(python_script), PythonVerbose=False)
        self.config = {**base, **(config or {}), **(extra_config or {})}
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"

    # -- process ------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc and wait until its REST API answers."""
        if self.running:
            return
        with open(self.directory / "orthanc.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(ORTHANC_BINARY), str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.directory}/orthanc.log")
            try:
                if httpx.get(f"{self.url}/system", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("Orthanc did not start in time")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait for the exit (the DICOM port stays busy until then)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- REST -------------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30.0)
        response.raise_for_status()
        return response.json()

    def get_or_none(self, path: str) -> Any:
        """GET ``path``: None on 404, JSON when Orthanc answers JSON, else the text (e.g. metadata)."""
        response = httpx.get(f"{self.url}{path}", timeout=30.0)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def post(self, path: str, body: Any) -> Any:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{self.url}{path}", content=content, timeout=30.0)
        response.raise_for_status()
        return response.json()

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a DICOM file through the REST API."""
        return self.post("/instances", path.read_bytes())

    def lookup(self, uid: str, level: str = "Study") -> str | None:
        """Orthanc's id of the Study / Series / Instance with this DICOM UID, or None."""
        for hit in self.post("/tools/lookup", uid.encode()):
            if hit["Type"] == level:
                return hit["ID"]
        return None

    def study_id(self, study_uid: str) -> str | None:
        return self.lookup(study_uid, "Study")

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The series of a study (with MainDicomTags), by Study Instance UID."""
        orthanc_id = self.study_id(study_uid)
        return [] if orthanc_id is None else self.get(f"/studies/{orthanc_id}/series")

    def instance_tags(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """Simplified tags of an instance by SOP Instance UID, or None when Orthanc does not have it."""
        orthanc_id = self.lookup(sop_instance_uid, "Instance")
        return None if orthanc_id is None else self.get(f"/instances/{orthanc_id}/simplified-tags")

    def count_instances(self) -> int:
        return len(self.get("/instances"))


#: The name the reporting tests and the end-to-end tests use.
OrthancProcess = OrthancServer


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A running Orthanc with the base test config, stopped after the test (import into a test module)."""
    server = OrthancServer(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()
