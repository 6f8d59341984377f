"""Settings, UID validation and PHI-free logging."""

from __future__ import annotations

import io
import json
import logging

import pytest

from radialog import logging as rlog
from radialog.settings import Settings
from radialog.uids import InvalidUID, is_valid_uid, require_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "2.25.123456789012345678901234567890", "1.2.0.3"])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid", ["", "1", "../../etc/passwd", "1.2.03", "1..2", "1.2.", "1.2.3/4", "1." + "1" * 70, None, 12, "1.2\x00"]
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID):
        require_uid(uid)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("RADIALOG_AE_TITLE", "CXR_AI")
    monkeypatch.setenv("RADIALOG_ALLOWED_CALLING_AETS", '["MOD1", "PACS"]')
    monkeypatch.setenv("RADIALOG_DESTINATIONS", '[{"name": "pacs", "ae_title": "ORTHANC", "port": 4242}]')
    monkeypatch.setenv("RADIALOG_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.ae_title == "CXR_AI"
    assert s.allowed_calling_aets == ["MOD1", "PACS"]
    assert s.destinations[0].ae_title == "ORTHANC"
    assert s.resolved_database_url.endswith("registry.sqlite")


def test_settings_file_and_env_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    cfg = tmp_path / "radialog.toml"
    cfg.write_text('ae_title = "FROMFILE"\ndicom_port = 10400\n')
    monkeypatch.setenv("RADIALOG_CONFIG", str(cfg))
    monkeypatch.setenv("RADIALOG_DICOM_PORT", "10500")
    s = Settings()
    assert s.ae_title == "FROMFILE" and s.dicom_port == 10500


def test_bad_ae_title_is_refused() -> None:
    with pytest.raises(ValueError):
        Settings(ae_title="THIS_AE_TITLE_IS_TOO_LONG")


def test_logs_are_json_and_carry_no_patient_data() -> None:
    stream = io.StringIO()
    rlog.configure(stream=stream)
    logging.getLogger("radialog.test").info(
        "stored", extra={"study": 7, "patient_name": "Doe^Jane", "PatientID": "X123", "uid": rlog.uid_ref("1.2.3")}
    )
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["msg"] == "stored" and line["study"] == 7 and len(line["uid"]) == 12
    assert "Doe^Jane" not in stream.getvalue() and "X123" not in stream.getvalue()
