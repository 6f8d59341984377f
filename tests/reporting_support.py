"""Test helpers for the reporting tests: a study with a synthetic image in the spool and the registry, a model
output to report, and real pynetdicom C-STORE peers (counting, SOP-class-refusing, failure-answering).

The study is written here directly (not through the node's receive path) so the reporting tests stand alone.
"""

from __future__ import annotations

import ssl
import subprocess
import threading
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage as SRStorage

from radialog.registry import Instance, Registry, Study, StudyState, utcnow
from radialog.settings import Destination, Settings
from radialog.synthetic import make_cxr
from radialog.model_output import ClassifierFinding, Provenance, ReportOutput

LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
FINDINGS_TEXT = "The cardiac silhouette is enlarged. There is a small left pleural effusion. No pneumothorax."
PROVENANCE = Provenance(name="RaDialog-LLaVA", version="2.0", files_sha256="5e" * 32, display_name="RaDialog")


def add_study(registry: Registry, settings: Settings, *, state: StudyState = StudyState.RUNNING) -> tuple[int, Dataset]:
    """A CR chest study with one image, spooled as the node would, selected for reporting."""
    ds = make_cxr(modality="CR", rows=128, cols=128)
    relative = Path(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    path = settings.spool_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    now = utcnow()
    with registry.session() as session:
        study = Study(
            study_instance_uid=ds.StudyInstanceUID, state=state.value, patient_name=str(ds.PatientName),
            patient_id=ds.PatientID, accession_number=ds.AccessionNumber, study_date=ds.StudyDate,
            created_at=now, updated_at=now, last_instance_at=now,
        )
        session.add(study)
        session.flush()
        instance = Instance(
            study_id=study.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            series_instance_uid=ds.SeriesInstanceUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            path=relative.as_posix(), size_bytes=path.stat().st_size, received_at=now,
            attributes={"modality": "CR", "view_position": "PA", "body_part_examined": "CHEST"},
        )
        session.add(instance)
        session.flush()
        study.selected_instance_id = instance.id
        return study.id, ds


def model_output(study_id: int, text: str = FINDINGS_TEXT) -> ReportOutput:
    present = {"Cardiomegaly", "Pleural Effusion"}
    findings = [
        ClassifierFinding(label, 0.9 if label in present else round(0.02 * (i + 1), 2), label in present)
        for i, label in enumerate(LABELS)
    ]
    return ReportOutput(
        key=str(study_id), findings_text=text, findings=findings,
        findings_phrase="Predicted Findings: cardiomegaly, pleural effusion.", generated_tokens=24,
        timings={"generate": 0.5},
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' verdict: every line starting with 'Error' (warnings are allowed)."""
    result = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


class StorePeer:
    """A real pynetdicom C-STORE SCP on a free port.

    ``accept`` is the SOP class it accepts (SR by default; CT to refuse our SR at association) and
    ``status`` what it answers to each C-STORE (0x0000, or e.g. 0xA700 to refuse the instance);
    ``ssl_context`` makes it a DICOM TLS peer.
    """

    def __init__(
        self, *, ae_title: str = "PEER", accept: str = SRStorage, status: int = 0x0000,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.status = status
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(accept)
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=ssl_context,
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(str(event.dataset.SOPInstanceUID))
        return self.status

    def destination(self, name: str) -> Destination:
        return Destination(name=name, ae_title=self.ae_title, host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.server.shutdown()




def self_signed(directory: Path, name: str = "peer") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (openssl): (certfile, keyfile)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key
