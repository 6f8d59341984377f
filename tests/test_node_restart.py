"""Crash and restart: SIGKILL in the middle of a send, half-written temp files, renamed-but-unrecorded files."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from dicom_node import spool
from dicom_node.recovery import recover_spool
from radialog.registry import Instance, Registry
from radialog.settings import Settings
from radialog.synthetic import make_cxr
from tests.support.dicom_files import dataset_bytes, save
from tests.support.dicom_peers import scu, store_all
from tests.support.node import running_node
from tests.support.processes import radialog_env, radialog_process


def test_recovery_removes_temp_files_and_records_orphans(
    tmp_path: Path, settings: Settings, sqlite_registry: Registry
) -> None:
    orphan = make_cxr(rows=32, cols=32)
    source = save(orphan, tmp_path, "orphan")
    # A crash between rename and registry commit leaves a complete file the registry does not know ...
    temp = spool.write_temp(settings.spool_dir, [source.read_bytes()])
    spool.commit_file(settings.spool_dir, temp, spool.relative_path(orphan.StudyInstanceUID, orphan.SOPInstanceUID))
    # ... a crash mid-write leaves a temp file; a file under a wrong name is reported, not recorded.
    (settings.spool_dir / spool.INCOMING / "tmpabc.part").write_bytes(b"\x00" * 100)
    stray = settings.spool_dir / generate_uid() / f"{generate_uid()}.dcm"
    stray.parent.mkdir()
    stray.write_bytes(source.read_bytes())
    report = recover_spool(settings, sqlite_registry)
    assert (report.partial_removed, report.orphans_recorded, report.orphans_unusable) == (1, 1, 1)
    assert not list((settings.spool_dir / spool.INCOMING).iterdir())
    assert recover_spool(settings, sqlite_registry).orphans_recorded == 0
    with running_node(settings, sqlite_registry) as node:
        assert store_all(node.port, [source]) == [0], "the sender's retry is a duplicate"
    with sqlite_registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1


@contextmanager
def node_process(settings: Settings, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``radialog node --port 0`` as a separate process (output in ``log``); yields it and the port it logged."""
    env = radialog_env(
        {
            "RADIALOG_DATA_DIR": settings.data_dir,
            "RADIALOG_MIN_FREE_BYTES": 0,
            "RADIALOG_STABLE_AFTER": 3600,
            "RADIALOG_DICOM_HOST": "127.0.0.1",
        }
    )
    node = radialog_process(log.stem, ["node", "--port", "0", "--no-enqueue"], env, log.parent)
    try:
        line = node.wait_for_output(r'.*"node listening".*')
        yield node.popen, int(json.loads(line.group(0))["port"])
    finally:
        node.stop()


@pytest.mark.slow
def test_sigkill_mid_send_loses_no_acknowledged_instance(tmp_path: Path, settings: Settings) -> None:
    study = generate_uid()
    files = [
        save(make_cxr(rows=1536, cols=1536, study_uid=study, seed=i), tmp_path / "src", f"f{i:02d}") for i in range(16)
    ]
    acknowledged: list[Path] = []
    with node_process(settings, tmp_path / "node1.log") as (proc, port):
        ae = scu([(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
        assoc = ae.associate("127.0.0.1", port, ae_title="RADIALOG")
        assert assoc.is_established
        for path in files:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(path)
            if "Status" in status and status.Status == 0:
                acknowledged.append(path)
                if len(acknowledged) == 4:  # kill while the next dataset is on its way
                    threading.Timer(0.05, proc.kill).start()
        assoc.abort()
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
    assert 4 <= len(acknowledged) < len(files)

    with node_process(settings, tmp_path / "node2.log") as (_proc, port):
        registry = Registry(settings.resolved_database_url)
        try:
            with registry.session() as session:
                rows = {row.sop_instance_uid: row.path for row in session.scalars(select(Instance))}
            for path in acknowledged:
                sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
                stored = settings.spool_dir / rows[sop]
                assert dataset_bytes(stored) == dataset_bytes(path)
                assert dcmread(stored).pixel_array.shape == (1536, 1536)
            assert not list((settings.spool_dir / spool.INCOMING).iterdir())
            # The sender retries everything: all Success, each instance once.
            assert store_all(port, files) == [0] * len(files)
            with registry.session() as session:
                assert session.scalar(select(func.count()).select_from(Instance)) == len(files)
            assert len(list((settings.spool_dir / study).glob("*.dcm"))) == len(files)
        finally:
            registry.dispose()


def test_cli_node_serves_and_stops_on_sigterm(tmp_path: Path, settings: Settings) -> None:
    log = tmp_path / "node.log"
    with node_process(settings, log) as (proc, port):
        run = subprocess.run(
            ["echoscu", "-aec", "RADIALOG", "127.0.0.1", str(port)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    messages = [json.loads(line)["msg"] for line in log.read_text().splitlines() if line.startswith("{")]
    assert "node stopped" in messages
