"""End to end, every part a real process: storescu -> Orthanc (router plugin) -> `radialog node` ->
Celery on the real Redis -> `radialog worker` (tiny model) -> SR back into Orthanc (dciodvfy-clean) ->
dialog turn and approval through `radialog api` -> VERIFIED SR in Orthanc. Also: a lateral-only study is
SKIPPED with its reason, and non-chest images are refused or skipped, never reported.

One chain (PostgreSQL schema, Redis database 10) serves the module's tests.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from bench.e2e import pg_schema
from composition.chain import ORTHANC, PYTHON_PLUGIN, Chain, wait_until
from radialog.synthetic import make_cxr
from tests.support.brokers import redis_url

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not ORTHANC.exists() or not PYTHON_PLUGIN.exists(), reason="needs orthanc + orthanc-python"),
    pytest.mark.skipif(
        shutil.which("dciodvfy") is None or shutil.which("storescu") is None,
        reason="needs dicom3tools (dciodvfy) and dcmtk (storescu)",
    ),
]
REDIS_URL = redis_url(__name__)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    from workers.models.radialog_v2.tiny import make_tiny

    workdir = tmp_path_factory.mktemp("e2e")
    model_dir, base_dir = make_tiny(workdir / "model")
    with pg_schema() as database_url:
        running = Chain(
            workdir / "chain",
            database_url=database_url,
            redis_url=REDIS_URL,
            model_dir=model_dir,
            base_model_dir=base_dir,
        )
        with running:
            try:
                yield running
            except BaseException:
                print(running.logs())
                raise


def write(datasets: list[Dataset], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dciodvfy_errors(data: bytes, path: Path) -> list[str]:
    path.write_bytes(data)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_chest_study_comes_back_as_sr_then_dialog_and_approval(chain: Chain, tmp_path: Path) -> None:
    pa = make_cxr(modality="CR", view_position="PA", patient_index=910001)
    lateral = make_cxr(modality="CR", view_position="LL", patient_index=910001, study_uid=pa.StudyInstanceUID, seed=3)
    accession, study_uid = str(pa.AccessionNumber), str(pa.StudyInstanceUID)
    assert chain.storescu(write([pa, lateral], tmp_path / "in")).returncode == 0

    study = chain.wait_state(accession, {"EXPORTED", "SKIPPED", "FAILED"})
    assert study["state"] == "EXPORTED", study
    detail = chain.api("GET", f"/api/v1/studies/{study['id']}").json()
    chosen = [i for i in detail["instances"] if i["id"] == detail["selected_instance_id"]]
    assert chosen and chosen[0]["sop_instance_uid"] == pa.SOPInstanceUID  # the frontal image, not the lateral

    # the draft SR is in Orthanc, in the same study, preliminary and unverified, and valid DICOM
    (draft,) = wait_until(lambda: chain.orthanc_srs(study_uid), 60, "the draft SR in Orthanc")
    assert draft["StudyInstanceUID"] == study_uid and draft["Modality"] == "SR"
    assert draft["PreliminaryFlag"] == "PRELIMINARY" and draft["VerificationFlag"] == "UNVERIFIED"
    assert dciodvfy_errors(chain.orthanc_file(draft["ID"]), tmp_path / "draft.dcm") == []
    report = chain.api("GET", f"/api/v1/studies/{study['id']}/report").json()
    assert report["version"] == 1 and not report["verified"] and report["findings_text"]

    # a dialog turn answered by the worker through the API
    turn = chain.api(
        "POST",
        f"/api/v1/studies/{study['id']}/dialog/questions",
        json={"question": "Is there any pleural effusion?", "wait_seconds": 120},
    )
    assert turn.status_code == 200, turn.text
    assert turn.json()["state"] == "DONE" and turn.json()["answer"] is not None

    # the radiologist approves the draft as shown: a VERIFIED version that references it, also in Orthanc
    approved = chain.api(
        "POST",
        f"/api/v1/studies/{study['id']}/report/approve",
        json={
            "findings_text": report["findings_text"],
            "impression_text": report["impression_text"] or "",
            "base_version": 1,
        },
    )
    assert approved.status_code == 201, approved.text
    assert approved.json()["verified"] and approved.json()["version"] == 2

    def verified_sr() -> list[dict]:
        return [sr for sr in chain.orthanc_srs(study_uid) if sr.get("VerificationFlag") == "VERIFIED"]

    (final,) = wait_until(verified_sr, 120, "the VERIFIED SR in Orthanc", chain.check_alive)
    assert final["StudyInstanceUID"] == study_uid and final["SOPInstanceUID"] != draft["SOPInstanceUID"]
    predecessors = final["PredecessorDocumentsSequence"][0]["ReferencedSeriesSequence"][0]["ReferencedSOPSequence"]
    assert [p["ReferencedSOPInstanceUID"] for p in predecessors] == [draft["SOPInstanceUID"]]
    assert chain.user in str(final["VerifyingObserverSequence"])
    assert dciodvfy_errors(chain.orthanc_file(final["ID"]), tmp_path / "final.dcm") == []
    assert len(chain.orthanc_srs(study_uid)) == 2  # draft + approved, nothing sent twice


def test_lateral_only_study_is_skipped_with_its_reason(chain: Chain, tmp_path: Path) -> None:
    lateral = make_cxr(modality="DX", view_position="LL", patient_index=910002)
    assert chain.storescu(write([lateral], tmp_path / "in")).returncode == 0
    study = chain.wait_state(str(lateral.AccessionNumber), {"SKIPPED", "QUEUED", "REPORTED", "EXPORTED", "FAILED"})
    assert study["state"] == "SKIPPED" and "lateral" in (study["reason"] or "").lower(), study
    assert chain.orthanc_srs(str(lateral.StudyInstanceUID)) == []


def test_non_chest_images_are_refused_or_skipped_never_reported(chain: Chain, tmp_path: Path) -> None:
    # a CR of a knee: Orthanc forwards it (CR), the node stores it and skips the study with the reason
    knee = make_cxr(modality="CR", view_position="AP", body_part="KNEE", patient_index=910003)
    assert chain.storescu(write([knee], tmp_path / "knee")).returncode == 0
    study = chain.wait_state(str(knee.AccessionNumber), {"SKIPPED", "QUEUED", "REPORTED", "EXPORTED", "FAILED"})
    assert study["state"] == "SKIPPED" and "KNEE" in (study["reason"] or "").upper(), study

    # a CT-like instance: Orthanc keeps it (never routed), and sent straight to the node it is refused
    ct = make_cxr(modality="CR", view_position=None, body_part="ABDOMEN", patient_index=910004)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.Modality = "CT"
    (ct_path,) = write([ct], tmp_path / "ct")
    assert chain.storescu([ct_path]).returncode == 0  # into Orthanc
    direct = chain.storescu([ct_path], port=chain.node_port, called="RADIALOG")
    assert direct.returncode != 0 or "Failed" in direct.stderr, direct.stderr
    orthanc_study = chain.orthanc_post("/tools/lookup", str(ct.StudyInstanceUID))
    routing = wait_until(
        lambda: chain.orthanc(f"/studies/{orthanc_study[0]['ID']}/metadata?expand").get("RadialogRouting"),
        60,
        "the router to look at the CT study",
    )
    assert '"forwarded": 0' in routing
    assert chain.study_by_accession(str(ct.AccessionNumber)) is None  # the node never saw it
    assert chain.orthanc_srs(str(knee.StudyInstanceUID)) == [] and chain.orthanc_srs(str(ct.StudyInstanceUID)) == []


def test_our_processes_logged_no_patient_data(chain: Chain) -> None:
    """After the studies above went through node, worker and API, their logs name no patient.

    (Runs last in this module: names, IDs and accession numbers of every patient sent above.)
    """
    ours = [p for p in chain.processes if p.name != "orthanc"]
    assert {p.name for p in ours} == {"node", "worker", "api"}
    logs = "\n".join(p.log_path.read_text(errors="replace") for p in ours)
    assert "instance stored" in logs and "AI draft created" in logs  # the logs did record the work
    for index in (910001, 910002, 910003, 910004):
        for identifier in (f"Synthetic^Patient{index}", f"SYN{index:05d}", f"ACC{index:06d}"):
            assert identifier not in logs, f"{identifier} appears in a log"
