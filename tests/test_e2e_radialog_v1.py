"""End to end with RADIALOG_MODEL_BACKEND=radialog-v1 (issue 17), every part a real process: storescu -> Orthanc ->
`radialog node` -> Redis -> `radialog worker` (tiny RaDialog v1 set through the real loader and the engine,
projector replayed) -> SR in Orthanc (named after RaDialog v1, its version saying the projector is replayed,
CheXpert findings coded, dciodvfy-clean) -> the model's capabilities, a yes/no quick action and a follow-up
question, and a refused v2-only action through `radialog api`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from bench.e2e import pg_schema
from composition.chain import ORTHANC, PYTHON_PLUGIN, Chain, wait_until
from radialog.synthetic import make_cxr
from tests.support.brokers import redis_url
from tests.test_e2e import dciodvfy_errors, write
from tests.test_sr import _content_items

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
    from workers.models.radialog_v1.tiny import make_tiny

    workdir = tmp_path_factory.mktemp("e2e-radialog-v1")
    paths = make_tiny(workdir / "model")
    with pg_schema() as database_url:
        running = Chain(workdir / "chain", database_url=database_url, redis_url=REDIS_URL, extra_env=paths.env())
        with running:
            try:
                yield running
            except BaseException:
                print(running.logs())
                raise


def test_radialog_v1_reports_a_study_into_orthanc_and_answers_through_the_api(chain: Chain, tmp_path: Path) -> None:
    pa = make_cxr(modality="CR", view_position="PA", patient_index=930001)
    accession, study_uid = str(pa.AccessionNumber), str(pa.StudyInstanceUID)
    assert chain.storescu(write([pa], tmp_path / "in")).returncode == 0
    study = chain.wait_state(accession, {"EXPORTED", "SKIPPED", "FAILED"})
    assert study["state"] == "EXPORTED", study

    (draft,) = wait_until(lambda: chain.orthanc_srs(study_uid), 60, "the draft SR in Orthanc")
    assert draft["StudyInstanceUID"] == study_uid
    assert draft["SeriesDescription"] == "AI draft report (RaDialog v1) - not verified"
    assert draft["PreliminaryFlag"] == "PRELIMINARY" and draft["VerificationFlag"] == "UNVERIFIED"
    data = chain.orthanc_file(draft["ID"])
    assert dciodvfy_errors(data, tmp_path / "draft.dcm") == []
    sr = dcmread(tmp_path / "draft.dcm")
    equipment = [e for e in sr.ContributingEquipmentSequence if e.get("ManufacturerModelName") == "RaDialog-v1"]
    assert equipment and equipment[0].SoftwareVersions == "1.0+projector-replay-seed42"
    items = _content_items(sr)
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert "RaDialog-v1" in texts and "1.0+projector-replay-seed42" in texts  # TID 4019 name and version
    report = chain.api("GET", f"/api/v1/studies/{study['id']}/report").json()
    document = report["document"]
    assert document["model"] == {
        "name": "RaDialog-v1",
        "version": "1.0+projector-replay-seed42",
        "files_sha256": document["model"]["files_sha256"],
    }
    assert len(document["findings"]) == 14  # the classifier's CheXpert labels

    model = chain.api("GET", "/api/v1/model").json()
    assert model["backend"] == "radialog-v1" and "impression" not in model["tasks"]
    url = f"/api/v1/studies/{study['id']}/dialog"
    yes_no = chain.api("POST", url + "/actions", json={"action": "yes_no", "finding": "Edema", "wait_seconds": 120})
    assert yes_no.status_code == 200, yes_no.text
    assert yes_no.json()["question"] == "Is there any Edema?" and yes_no.json()["state"] == "DONE"
    free = chain.api("POST", url + "/questions", json={"question": "Is the heart enlarged?", "wait_seconds": 120})
    assert free.status_code == 200, free.text
    assert free.json()["state"] == "DONE" and free.json()["answer"]
    refused = chain.api("POST", url + "/actions", json={"action": "impression"})
    assert refused.status_code == 422 and "task-not-supported" in refused.json()["type"]
    conversation = chain.api("GET", url).json()
    assert [t["state"] for t in conversation["turns"]] == ["DONE", "DONE"]
    assert conversation["max_context_tokens"] == 2048
