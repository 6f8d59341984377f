"""C-STORE into the node with real peers: transfer syntaxes as received, duplicates, bad UIDs, 0xA700."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from sqlalchemy import func, select

from radialog.registry import Instance, Registry, Study, StudyState
from radialog.settings import Settings
from radialog.synthetic import make_cxr, to_jpeg_baseline
from tests.support.dicom_files import dataset_bytes, save
from tests.support.dicom_peers import echo, store_all
from tests.support.node import running_node

ENCODED = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
]
#: No encoder for these in pydicom: the frame bytes are placeholders, which is fine because the node
#: stores what arrives without decoding it (the worker reports unreadable pixels, not the node).
PLACEHOLDER = [JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSNearLossless]


def _instance(syntax: str, study_uid: str, seed: int) -> object:
    ds = make_cxr(rows=256, cols=256, study_uid=study_uid, seed=seed)
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax in PLACEHOLDER:
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(256)) * 8 + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax == JPEG2000:
        ds.compress(syntax, j2k_cr=[20])
    else:
        ds.compress(syntax)
    return ds


def test_every_transfer_syntax_stored_as_received(
    tmp_path: Path, settings: Settings, sqlite_registry: Registry
) -> None:
    study = generate_uid()
    files = [save(_instance(ts, study, i), tmp_path / "src", f"i{i}") for i, ts in enumerate(ENCODED + PLACEHOLDER)]
    files.append(save(to_jpeg_baseline(make_cxr(rows=256, cols=256, study_uid=study)), tmp_path / "src", "jpeg"))
    with running_node(settings, sqlite_registry) as node:
        assert store_all(node.port, files) == [0] * len(files)
        assert node.store.streamed == len(files), "every dataset was written while it arrived"
    with sqlite_registry.session() as session:
        rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    assert len(rows) == len(files)
    for source in files:
        meta = dcmread(source, stop_before_pixels=True).file_meta
        row = rows[meta.MediaStorageSOPInstanceUID]
        stored = settings.spool_dir / row.path
        assert row.path == f"{study}/{meta.MediaStorageSOPInstanceUID}.dcm"
        assert row.transfer_syntax_uid == meta.TransferSyntaxUID
        assert dataset_bytes(stored) == dataset_bytes(source), meta.TransferSyntaxUID.name
        assert dcmread(stored).file_meta.TransferSyntaxUID == meta.TransferSyntaxUID
    assert not list((settings.spool_dir / ".incoming").iterdir())


def test_records_study_instance_and_attributes(settings: Settings, registry: Registry) -> None:
    ds = make_cxr(
        modality="DX", rows=128, cols=96, view_position="AP", laterality="U", series_description="Thorax AP liegend"
    )
    with running_node(settings, registry) as node:
        assert store_all(node.port, [ds]) == [0]
    with registry.session() as session:
        study = session.scalars(select(Study)).one()
        instance = study.instances[0]
        assert study.state == StudyState.RECEIVING.value
        assert study.last_instance_at is not None
        assert study.patient_id == ds.PatientID and study.accession_number == ds.AccessionNumber
        assert instance.calling_ae_title == "TESTSCU"
        assert instance.size_bytes == (settings.spool_dir / instance.path).stat().st_size
        a = instance.attributes
        assert (a["modality"], a["view_position"], a["image_laterality"]) == ("DX", "AP", "U")
        assert (a["rows"], a["columns"], a["presentation_intent_type"]) == (128, 96, "FOR PRESENTATION")
        assert a["image_type"] == ["ORIGINAL", "PRIMARY"] and a["series_description"] == "Thorax AP liegend"
        assert a["sop_class_uid"] == ds.SOPClassUID and a["photometric_interpretation"] == "MONOCHROME2"


def test_duplicate_stored_once(settings: Settings, registry: Registry) -> None:
    ds = make_cxr(rows=64, cols=64)
    with running_node(settings, registry) as node:
        assert store_all(node.port, [ds, ds]) == [0, 0]
        assert store_all(node.port, [ds]) == [0]
        stored = next(settings.spool_dir.glob("*/*.dcm"))
        stored.unlink()  # a recorded instance whose file is gone is restored by the next send
        assert store_all(node.port, [ds]) == [0]
        assert stored.is_file()
    with registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
    assert len(list(settings.spool_dir.glob("*/*.dcm"))) == 1


def test_same_sop_instance_in_another_study_is_refused(settings: Settings, sqlite_registry: Registry) -> None:
    first = make_cxr(rows=64, cols=64)
    second = make_cxr(rows=64, cols=64)
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    with running_node(settings, sqlite_registry) as node:
        assert store_all(node.port, [first, second]) == [0, 0xC000]
    with sqlite_registry.session() as session:
        row = session.scalars(select(Instance)).one()
        assert row.study.study_instance_uid == first.StudyInstanceUID
    assert not (settings.spool_dir / second.StudyInstanceUID).exists()


@pytest.mark.parametrize("bad_uid", ["../../etc", "1.2.840.abc", "1.2." + "3" * 70, "1..2"])
def test_invalid_study_uid_never_becomes_a_path(settings: Settings, sqlite_registry: Registry, bad_uid: str) -> None:
    ds = make_cxr(rows=64, cols=64)
    ds.StudyInstanceUID = bad_uid
    with running_node(settings, sqlite_registry) as node:
        assert store_all(node.port, [ds]) == [0xC000]
        assert echo(node.port)
    assert [p.name for p in settings.spool_dir.iterdir()] == [".incoming"]
    assert not list((settings.spool_dir / ".incoming").iterdir())
    with sqlite_registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_disk_below_min_free_bytes_is_out_of_resources(settings: Settings, sqlite_registry: Registry) -> None:
    full = settings.model_copy(update={"min_free_bytes": 1 << 62})
    with running_node(full, sqlite_registry) as node:
        assert store_all(node.port, [make_cxr(rows=64, cols=64)]) == [0xA700]
        incoming = full.spool_dir / ".incoming"
        assert not incoming.exists() or not list(incoming.iterdir()), "nothing streamed to a full disk"
    with sqlite_registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_registry_failure_is_out_of_resources(settings: Settings, registry: Registry) -> None:
    with running_node(settings, registry) as node:
        with registry.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE study_events")
            conn.exec_driver_sql("DROP TABLE instances" + (" CASCADE" if registry.url.startswith("postgres") else ""))
        assert store_all(node.port, [make_cxr(rows=64, cols=64)]) == [0xA700]
        assert echo(node.port), "the node keeps serving after a registry failure"


def test_missing_postgresql_schema_is_out_of_resources(settings: Settings, sqlite_registry: Registry) -> None:
    from tests.conftest import PG_URL

    broken = Registry(f"{PG_URL}?options=-csearch_path%3Dno_such_schema_radialog")
    try:
        with running_node(settings, sqlite_registry) as node:
            node.store.registry = broken
            assert store_all(node.port, [make_cxr(rows=64, cols=64)]) == [0xA700]
    finally:
        broken.dispose()


def test_dcmtk_storescu(tmp_path: Path, settings: Settings, sqlite_registry: Registry) -> None:
    study = generate_uid()
    files = [save(make_cxr(rows=128, cols=128, study_uid=study, seed=i), tmp_path, f"f{i}") for i in range(3)]
    files.append(save(to_jpeg_baseline(make_cxr(rows=128, cols=128, study_uid=study)), tmp_path, "jpeg"))
    with running_node(settings, sqlite_registry) as node:
        echo_run = subprocess.run(
            ["echoscu", "-aec", "RADIALOG", "127.0.0.1", str(node.port)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert echo_run.returncode == 0, echo_run.stderr
        run = subprocess.run(
            ["storescu", "-v", "-xy", "-aec", "RADIALOG", "127.0.0.1", str(node.port), *map(str, files)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert node.store.streamed == len(files)
    assert run.returncode == 0, run.stderr
    assert (run.stdout + run.stderr).count("Received Store Response (Success)") == len(files)
    for source in files:
        sop = dcmread(source, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(settings.spool_dir / study / f"{sop}.dcm") == dataset_bytes(source)


def test_concurrent_senders_of_one_study_and_instance(settings: Settings, registry: Registry) -> None:
    """Several associations at once: the same new study and the same SOP Instance UID -> one study, one row."""
    from concurrent.futures import ThreadPoolExecutor

    study = generate_uid()
    same = make_cxr(rows=256, cols=256, study_uid=study)
    others = [make_cxr(rows=64, cols=64, study_uid=study, seed=i) for i in range(4)]
    with running_node(settings, registry) as node, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda ds: store_all(node.port, [same, ds]), others))
    assert results == [[0, 0]] * 4
    with registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        assert session.scalar(select(func.count()).select_from(Instance)) == 5
    assert len(list((settings.spool_dir / study).glob("*.dcm"))) == 5


def test_memory_path_when_not_streamed(tmp_path: Path, settings: Settings, sqlite_registry: Registry) -> None:
    """Without the streamed file (streaming unusable) the handler writes the same bytes from memory."""
    source = save(_instance(RLELossless, generate_uid(), 1), tmp_path, "rle")
    with running_node(settings, sqlite_registry) as node:
        node.store.streams = None
        assert store_all(node.port, [source]) == [0]
        assert node.store.streamed == 0 and node.store.stored == 1
    stored = next(settings.spool_dir.glob("*/*.dcm"))
    assert dataset_bytes(stored) == dataset_bytes(source)
    assert dcmread(stored).file_meta.SourceApplicationEntityTitle == "TESTSCU"
