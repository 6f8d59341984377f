"""deploy/orthanc/radialog_router.py in a real Orthanc: forwards CR/DX chest studies to our node once,
retries while the node is down (across an Orthanc restart), and accepts our SRs back.

The node is played by a real pynetdicom C-STORE SCP started here; images go in with dcmtk's storescu.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pytest
from highdicom.sr import CodedConcept, ContainerContentItem, RelationshipTypeValues, TextContentItem
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage

from radialog.synthetic import make_cxr
from tests.support.dicom_peers import ALL_STORAGE, StorePeer
from tests.support.orthanc import OrthancProcess
from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.processes import Process

ROUTER = Path(__file__).resolve().parents[1] / "deploy" / "orthanc" / "radialog_router.py"
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
NODE_AET = "RADIALOG"
MODALITY_AET = "XRAY1"

pytestmark = pytest.mark.skipif(
    not PYTHON_PLUGIN.exists(), reason="Orthanc's Python plugin is missing: apt-get install orthanc-python"
)


def routed_orthanc(directory: Path, node_port: int) -> OrthancProcess:
    """Orthanc with the deployment's routing (deploy/orthanc/orthanc.json), test ports and fast retries."""
    shipped = json.loads((ROUTER.parent / "orthanc.json").read_text())
    config: dict[str, Any] = {
        "StableAge": 1,
        "Plugins": [str(PYTHON_PLUGIN)],
        "PythonScript": str(ROUTER),
        "UserMetadata": shipped["UserMetadata"],
        "DicomAlwaysAllowStore": False,  # only the listed modalities may store: the X-ray room and our node
        "DicomModalities": {
            "radialog": [NODE_AET, "127.0.0.1", node_port],
            "xray1": [MODALITY_AET, "127.0.0.1", 104],
        },
        "RadialogRouter": {
            **shipped["RadialogRouter"],
            "RetryInterval": 0.5,
            "MaxRetryInterval": 1,
            "CheckInterval": 0.2,
        },
    }
    return OrthancProcess(directory, extra_config=config)


def storescu(pacs: OrthancProcess, datasets: list[Dataset], directory: Path) -> None:
    """Send with dcmtk's storescu, as a modality would."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    subprocess.run(
        ["storescu", "-aet", MODALITY_AET, "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port), *paths],
        check=True,
        capture_output=True,
        timeout=60,
    )


def ct_like(study_uid: str | None = None) -> Dataset:
    """A CT image instance (same pixels, CT header): must never reach the node."""
    ds = make_cxr(study_uid=study_uid, view_position=None, body_part="ABDOMEN")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    return ds


def sr_for(source: Dataset) -> Dataset:
    """An SR in the source's study, as our node sends back."""
    root = ContainerContentItem(name=CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = [
        TextContentItem(
            name=CodedConcept("121071", "DCM", "Finding"),
            value="No acute cardiopulmonary process.",
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    ]
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="radialog tests",
    )


def send_as(calling_aet: str, pacs: OrthancProcess, ds: Dataset) -> int | None:
    """C-STORE one dataset; the status, or None when Orthanc refused the association."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ComprehensiveSRStorage)
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def routing(pacs: OrthancProcess, study_uid: str) -> dict:
    """The router's state for a study ({} until it has looked at it)."""
    study = pacs.lookup(study_uid)
    if study is None:
        return {}
    response = httpx.get(f"{pacs.url}/studies/{study}/metadata/RadialogRouting", timeout=30)
    return response.json() if response.status_code == 200 else {}


@pytest.fixture
def node() -> Iterator[StorePeer]:
    """A C-STORE SCP standing in for our node: records what it receives."""
    peer = StorePeer(ae_title=NODE_AET, accept=ALL_STORAGE)
    yield peer
    peer.stop()


def test_forwards_cr_dx_images_once_never_ct_or_our_sr(tmp_path: Path, node: StorePeer) -> None:
    study_uid = generate_uid()
    series_uid = generate_uid()
    pa = make_cxr(modality="DX", view_position="PA", study_uid=study_uid, series_uid=series_uid)
    lateral = make_cxr(modality="DX", view_position="LL", study_uid=study_uid, series_uid=series_uid, seed=1)
    ct_in_study = ct_like(study_uid)
    ct_study = ct_like()
    with routed_orthanc(tmp_path / "orthanc", node.port) as pacs:
        storescu(pacs, [pa, lateral, ct_in_study, ct_study], tmp_path / "out")

        first = wait_for(lambda: (r := routing(pacs, study_uid)).get("forwarded") == 2 and r, what="forward")
        assert first["state"] == "idle" and first["stable_events"] == 1
        wait_for(lambda: routing(pacs, ct_study.StudyInstanceUID).get("stable_events") == 1, what="CT study")
        assert routing(pacs, ct_study.StudyInstanceUID)["forwarded"] == 0
        # the node decides lateral vs frontal: routing sends both CR/DX images, never the CT
        assert sorted(node.stored()) == sorted([(pa.SOPInstanceUID, "DX"), (lateral.SOPInstanceUID, "DX")])

        # our SR comes back into the study (the node's AE title is a known modality) ...
        assert send_as(NODE_AET, pacs, sr_for(pa)) == 0x0000
        # ... while an unknown AE title may not store (DicomAlwaysAllowStore false)
        assert send_as("STRANGER", pacs, sr_for(pa)) not in (0x0000,)
        # the SR makes the study stable a second time: looked at, nothing re-sent
        wait_for(lambda: routing(pacs, study_uid).get("stable_events") == 2, what="second STABLE_STUDY")
        assert routing(pacs, study_uid)["forwarded"] == 2
        assert len(node.received) == 2
        series = pacs.study_series(study_uid)
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "DX", "SR"]


def test_retries_while_node_is_down_even_across_an_orthanc_restart(tmp_path: Path) -> None:
    node_port = free_port()  # nothing listens there yet: the node is down
    image = make_cxr(modality="CR", view_position="AP")
    with routed_orthanc(tmp_path / "orthanc", node_port) as pacs:
        storescu(pacs, [image], tmp_path / "out")
        failed = wait_for(
            lambda: (r := routing(pacs, image.StudyInstanceUID)).get("state") == "retrying" and r,
            what="a failed forward",
        )
        assert failed["forwarded"] == 0 and failed["last_error"]

        pacs.restart()  # the pending forward is kept in the study's metadata
        wait_for(
            lambda: routing(pacs, image.StudyInstanceUID).get("attempts", 0) > failed["attempts"],
            what="a retry after the restart",
        )

        peer = StorePeer(ae_title=NODE_AET, accept=ALL_STORAGE, port=node_port)  # the node comes up
        try:
            done = wait_for(
                lambda: (r := routing(pacs, image.StudyInstanceUID)).get("forwarded") == 1 and r,
                what="the forward once the node is up",
            )
            assert done["state"] == "idle" and done["last_error"] is None
            assert set(peer.received) == {image.SOPInstanceUID}
        finally:
            peer.stop()


def test_shipped_orthanc_config_starts_with_auth_and_modalities(tmp_path: Path) -> None:
    """deploy/orthanc/orthanc.json as compose uses it (paths and ports moved): the password comes from the
    environment, the REST API refuses anonymous calls, our node is a known modality, the router loads."""
    config = json.loads((ROUTER.parent / "orthanc.json").read_text())
    port = free_port()
    config.update(
        StorageDirectory=str(tmp_path / "db"),
        IndexDirectory=str(tmp_path / "db"),
        HttpPort=port,
        DicomPort=free_port(),
        PythonScript=str(ROUTER),
        RemoteAccessAllowed=False,
    )
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    env = {"PATH": "/usr/bin:/bin", "ORTHANC_PASSWORD": "s3cret-for-test"}
    process = Process("orthanc", ["/usr/sbin/Orthanc", str(tmp_path / "orthanc.json")], env, tmp_path)
    url, auth = f"http://127.0.0.1:{port}", ("radialog", "s3cret-for-test")
    try:
        wait_for(lambda: _status(f"{url}/system") == 401, what="Orthanc to answer (anonymous: 401)")
        assert httpx.get(f"{url}/system", auth=("radialog", "wrong"), timeout=10).status_code == 401
        modalities = httpx.get(f"{url}/modalities?expand", auth=auth, timeout=10).json()
        assert modalities["radialog"]["AET"] == NODE_AET and modalities["radialog"]["Port"] == 11112
        assert "python" in httpx.get(f"{url}/plugins", auth=auth, timeout=10).json()
    finally:
        process.stop()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None
