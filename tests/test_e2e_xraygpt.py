"""End to end with RADIALOG_MODEL_BACKEND=xraygpt (issue 16), every part a real process: storescu ->
Orthanc -> `radialog node` -> Redis -> `radialog worker` (tiny XrayGPT set through the real loader and the
engine) -> SR in Orthanc (named after XrayGPT, no coded findings, dciodvfy-clean) -> the model's
capabilities, a free question, an XrayGPT quick action and a refused RaDialog one through `radialog api`."""

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
    from workers.models.xraygpt.tiny import make_tiny

    workdir = tmp_path_factory.mktemp("e2e-xraygpt")
    paths = make_tiny(workdir / "model")
    with pg_schema() as database_url:
        running = Chain(workdir / "chain", database_url=database_url, redis_url=REDIS_URL, extra_env=paths.env())
        with running:
            try:
                yield running
            except BaseException:
                print(running.logs())
                raise


def test_xraygpt_reports_a_study_into_orthanc_and_answers_through_the_api(chain: Chain, tmp_path: Path) -> None:
    pa = make_cxr(modality="CR", view_position="PA", patient_index=920001)
    accession, study_uid = str(pa.AccessionNumber), str(pa.StudyInstanceUID)
    assert chain.storescu(write([pa], tmp_path / "in")).returncode == 0
    study = chain.wait_state(accession, {"EXPORTED", "SKIPPED", "FAILED"})
    assert study["state"] == "EXPORTED", study

    (draft,) = wait_until(lambda: chain.orthanc_srs(study_uid), 60, "the draft SR in Orthanc")
    assert (
        draft["StudyInstanceUID"] == study_uid
        and draft["SeriesDescription"] == "AI draft report (XrayGPT) - not verified"
    )
    assert draft["PreliminaryFlag"] == "PRELIMINARY" and draft["VerificationFlag"] == "UNVERIFIED"
    data = chain.orthanc_file(draft["ID"])
    assert dciodvfy_errors(data, tmp_path / "draft.dcm") == []
    sr = dcmread(tmp_path / "draft.dcm")
    assert "XrayGPT" in [e.get("ManufacturerModelName") for e in sr.ContributingEquipmentSequence]
    items = _content_items(sr)
    assert not [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"]
    assert "XrayGPT" in [i.TextValue for i in items if i.ValueType == "TEXT"]  # TID 4019 algorithm name
    report = chain.api("GET", f"/api/v1/studies/{study['id']}/report").json()
    assert report["document"]["findings"] == [] and report["document"]["model"]["name"] == "XrayGPT"

    model = chain.api("GET", "/api/v1/model").json()
    assert model["backend"] == "xraygpt" and set(model["tasks"]) == {"free", "list", "impression"}
    url = f"/api/v1/studies/{study['id']}/dialog"
    turn = chain.api(
        "POST", url + "/questions", json={"question": "Is there any pleural effusion?", "wait_seconds": 120}
    )
    assert turn.status_code == 200, turn.text
    assert turn.json()["state"] == "DONE" and turn.json()["answer"] is not None
    impression = chain.api("POST", url + "/actions", json={"action": "impression", "wait_seconds": 120})
    assert impression.status_code == 200, impression.text
    assert impression.json()["question"] == (
        "Based on the findings in this chest x-ray image, what is the overall impression?"
    )
    refused = chain.api("POST", url + "/actions", json={"action": "yes_no", "finding": "Edema"})
    assert refused.status_code == 422 and "task-not-supported" in refused.json()["type"]
    conversation = chain.api("GET", url).json()
    assert [t["state"] for t in conversation["turns"]] == ["DONE", "DONE"]
    assert conversation["max_context_tokens"] == 2000
