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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from tests.support.polling import WaitTimeout, wait_for
from tests.support.ports import free_port
from tests.support.processes import Process

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
AE_TITLE = "ORTHANC"


def require_orthanc(python_plugin: bool = False) -> None:
    """Skip the test when Orthanc (or its Python plugin) is not installed on this machine."""
    if not ORTHANC_BINARY.exists():
        pytest.skip("Orthanc is not installed")
    if python_plugin and not PYTHON_PLUGIN.exists():
        pytest.skip("Orthanc's Python plugin is not installed")


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
        self.process: Process | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"

    # -- process ------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc and wait until its REST API answers (log: ``<directory>/orthanc.log``)."""
        if self.running:
            return
        process = self.process = Process(
            "orthanc", [str(ORTHANC_BINARY), str(self.config_path)], {**os.environ}, self.directory
        )

        def answers() -> bool:
            try:
                return httpx.get(f"{self.url}/system", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        def alive() -> None:
            if process.returncode is not None:
                raise RuntimeError(f"Orthanc exited with {process.returncode}; see {process.log_path}")

        try:
            wait_for(answers, what="Orthanc's REST API", timeout=timeout, interval=0.05, check=alive)
        except WaitTimeout:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait for the exit (the DICOM port stays busy until then)."""
        if self.process is not None:
            self.process.stop(timeout)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

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
