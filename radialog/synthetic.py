"""Synthetic chest X-ray DICOM instances for the demo, the benchmarks and the tests.

The picture is a crude chest: bright mediastinum and ribs, darker lungs, a bright border. Headers follow
real CR/DX files (including the ways they vary: view position, photometric interpretation, bits stored,
body part, laterality). Patient identifiers are fake. Compressed transfer syntaxes are made with
pydicom's encoders (``ds.compress``) or, for JPEG baseline, Pillow.
"""

from __future__ import annotations

import io
from datetime import date

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

SOP_CLASSES = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "DX-PROC": DigitalXRayImageStorageForProcessing,
}


def chest_pixels(rows: int, cols: int, bits_stored: int = 12, seed: int = 0) -> np.ndarray:
    """A chest-like radiograph, high values = dense (white bones, MONOCHROME2)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    yn, xn = y / rows, x / cols
    img = np.full((rows, cols), 0.55, np.float32)
    for cx in (0.3, 0.7):  # lungs: dark ellipses
        lung = ((xn - cx) / 0.17) ** 2 + ((yn - 0.48) / 0.3) ** 2 < 1
        img[lung] = 0.2
    img += 0.45 * np.exp(-(((xn - 0.5) / 0.07) ** 2)) * (yn > 0.15)  # mediastinum / spine
    heart = ((xn - 0.55) / 0.13) ** 2 + ((yn - 0.62) / 0.12) ** 2 < 1
    img[heart] = np.maximum(img[heart], 0.7)
    img += 0.12 * (np.sin(yn * 60 + np.abs(xn - 0.5) * 8) > 0.85)  # ribs
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    img = np.clip(img, 0, 1)
    return (img * (2**bits_stored - 1)).astype(np.uint16)


def make_cxr(
    *,
    modality: str = "CR",
    view_position: str | None = "PA",
    body_part: str | None = "CHEST",
    rows: int = 512,
    cols: int = 512,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_index: int = 0,
    laterality: str | None = None,
    series_description: str | None = None,
    seed: int = 0,
) -> Dataset:
    """One CR or DX instance (``modality`` 'CR', 'DX' or 'DX-PROC'), uncompressed explicit VR LE."""
    sop_class = SOP_CLASSES[modality]
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = f"Synthetic^Patient{patient_index}"
    ds.PatientID = f"SYN{patient_index:05d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.StudyDate = date.today().strftime("%Y%m%d")  # noqa: DTZ011 - DICOM dates are the local date
    ds.StudyTime = "101010"
    ds.AccessionNumber = f"ACC{patient_index:06d}"
    ds.StudyID = "1"
    ds.StudyDescription = "XR CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "CR" if modality == "CR" else "DX"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view_position is not None:
        ds.ViewPosition = view_position
    if laterality is not None:
        ds.ImageLaterality = laterality
    if series_description is not None:
        ds.SeriesDescription = series_description
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "radialog-node synthetic"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [0.143, 0.143]
    if ds.Modality == "DX":
        ds.PresentationIntentType = "FOR PROCESSING" if modality == "DX-PROC" else "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    pixels = chest_pixels(rows, cols, bits_stored, seed)
    if photometric == "MONOCHROME1":
        pixels = (2**bits_stored - 1) - pixels
    if ds.BitsAllocated == 8:
        pixels = pixels.astype(np.uint8)
    ds.PixelData = pixels.tobytes()
    ds.WindowCenter = 2 ** (bits_stored - 1)
    ds.WindowWidth = 2**bits_stored
    return ds


def to_jpeg_baseline(ds: Dataset, quality: int = 90) -> Dataset:
    """Re-encode an instance as JPEG baseline (8-bit, what many CR archives send)."""
    from PIL import Image

    arr = ds.pixel_array.astype(np.float32)
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0) * 255
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "L").save(buf, "JPEG", quality=quality)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds
