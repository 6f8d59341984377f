"""Seeding helpers for the API's tests and demos: real registry rows, real spool files, and AI drafts
made by ``reporting.versions.create_ai_draft`` (the same call the workers make)."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from radialog.presence import ready_key
from radialog.registry import Instance, Registry, Study, StudyState, transition, utcnow
from radialog.settings import Settings
from radialog.synthetic import make_cxr

USERS = {"reader": "reader", "rad": "radiologist", "admin": "admin"}


def make_keys(registry: Registry) -> dict[str, str]:
    """One user per role (names: reader, rad, admin); returns name -> key."""
    from api.users import create_user

    with registry.session() as session:
        return {name: create_user(session, name, role) for name, role in USERS.items()}


def add_study(registry: Registry, settings: Settings, *, state: StudyState = StudyState.QUEUED,
              index: int = 0, study_date: str | None = None, reason: str | None = None) -> tuple[int, Dataset]:
    """A study with one CR instance in the spool (as the node stores it), moved to ``state`` through
    the state machine. Returns (study id, dataset)."""
    ds = make_cxr(patient_index=index, rows=256, cols=256, seed=index)
    if study_date:
        ds.StudyDate = study_date
    rel = Path(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    path = settings.spool_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    now = utcnow()
    with registry.session() as session:
        study = Study(study_instance_uid=ds.StudyInstanceUID, state=StudyState.RECEIVING.value,
                      patient_name=str(ds.PatientName), patient_id=ds.PatientID,
                      accession_number=ds.AccessionNumber, study_date=ds.StudyDate,
                      study_description=ds.StudyDescription, created_at=now, updated_at=now, last_instance_at=now)
        session.add(study)
        session.flush()
        instance = Instance(study_id=study.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                            series_instance_uid=ds.SeriesInstanceUID,
                            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(rel),
                            size_bytes=path.stat().st_size, calling_ae_title="TESTSCU", received_at=now,
                            attributes={"modality": "CR", "view_position": "PA", "body_part_examined": "CHEST",
                                        "sop_class_uid": ds.SOPClassUID,
                                        "photometric_interpretation": "MONOCHROME2", "rows": 256, "columns": 256})
        session.add(instance)
        session.flush()
        study.selected_instance_id = instance.id
        path_to = {
            StudyState.RECEIVING: [],
            StudyState.STABLE: [StudyState.STABLE],
            StudyState.QUEUED: [StudyState.STABLE, StudyState.QUEUED],
            StudyState.RUNNING: [StudyState.STABLE, StudyState.QUEUED, StudyState.RUNNING],
            StudyState.FAILED: [StudyState.STABLE, StudyState.QUEUED, StudyState.RUNNING, StudyState.FAILED],
            StudyState.SKIPPED: [StudyState.STABLE, StudyState.SKIPPED],
        }[state]
        for step in path_to:
            transition(session, study.id, step, reason if step == state else None)
        return study.id, ds


def add_reported_study(registry: Registry, settings: Settings, *, index: int = 0,
                       findings_text: str = "The heart size is normal. There is a small left pleural effusion.",
                       present: tuple[str, ...] = ("Pleural Effusion",)) -> int:
    """A study with an AI draft (version 1) written by reporting.versions.create_ai_draft."""
    from radialog.chexpert import CHEXPERT_LABELS
    from radialog.model_output import ClassifierFinding, Provenance, ReportOutput
    from reporting.versions import create_ai_draft
    from workers.models.prompts import findings_phrase

    study_id, _ = add_study(registry, settings, state=StudyState.RUNNING, index=index)
    findings = [ClassifierFinding(label, 0.9 if label in present else 0.1, label in present)
                for label in CHEXPERT_LABELS]
    output = ReportOutput(key=str(study_id), findings_text=findings_text, findings=findings,
                          findings_phrase=findings_phrase(present), generated_tokens=20, timings={"generate": 0.1})
    provenance = Provenance(name="RaDialog-LLaVA", version="2.0-test", files_sha256="0" * 64, tiny=True,
                            display_name="RaDialog")
    with registry.session() as session:
        create_ai_draft(session, settings, study_id, output, provenance)
    return study_id


class WorkerProcess:
    """A real ``radialog worker`` subprocess serving the ``dialog`` queue for the API's tests."""

    def __init__(self, settings: Settings, database_url: str, log_path: Path, name: str) -> None:
        import os
        import subprocess
        import sys

        self.name = name
        self.settings = settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
        env.update({
            "RADIALOG_DATA_DIR": str(settings.data_dir), "RADIALOG_DATABASE_URL": database_url,
            "RADIALOG_BROKER_URL": settings.broker_url, "RADIALOG_MODEL_DIR": str(settings.model_dir),
            "RADIALOG_BASE_MODEL_DIR": str(settings.base_model_dir), "RADIALOG_DEVICE": "cpu",
            "RADIALOG_MIN_FREE_BYTES": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        })
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "composition.cli", "worker", "--hostname", name, "--queues", "dialog,export",
             "--no-sweep"], env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Until the worker's readiness key (model loaded) is in Redis."""
        import time

        import redis

        client = redis.Redis.from_url(self.settings.broker_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if client.exists(ready_key(self.name)):
                    return
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited ({self.proc.returncode}):\n{self.tail()}")
                time.sleep(0.2)
            raise TimeoutError(f"worker not ready in {timeout} s:\n{self.tail()}")
        finally:
            client.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()
        # A killed worker leaves its readiness key until the TTL: gone now, so the next test counts right.
        import redis

        client = redis.Redis.from_url(self.settings.broker_url)
        try:
            client.delete(ready_key(self.name))
        finally:
            client.close()
