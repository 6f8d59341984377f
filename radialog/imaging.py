"""DICOM file -> the 8-bit grayscale picture the model was trained on (MIMIC-CXR-JPG style).

Decode (pydicom with the pylibjpeg / openjpeg / RLE handlers for compressed syntaxes) -> Modality LUT
(rescale slope/intercept or LUT) -> VOI LUT sequence or the first window -> MONOCHROME1 inverted so bones
are white -> min-max to uint8. Anything the model cannot use raises :class:`UnusableImage` with a reason
a person can read (it becomes the SKIPPED reason in the API). Torch-free: the node may import it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class UnusableImage(ValueError):
    """The instance cannot be turned into a model image; ``reason`` says why in plain words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_model_image(path: Path | str) -> np.ndarray:
    """Read one DICOM file and return a 2-D uint8 image, white bones (see module doc)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, ValueError) as error:
        raise UnusableImage(f"not a readable DICOM file: {error}") from error
    try:
        return dataset_to_model_image(ds)
    except UnusableImage:
        raise
    except Exception as error:  # a malformed header value (e.g. RescaleSlope "1,0") must fail this study only
        raise UnusableImage(
            f"the image's header values cannot be applied ({type(error).__name__} while windowing the pixels)"
        ) from error


def dataset_to_model_image(ds) -> np.ndarray:  # ds: pydicom Dataset (pydicom imported lazily)
    """As :func:`load_model_image`, from an already-read dataset."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = getattr(ds, "SOPClassUID", None)
        name = getattr(sop, "name", None) or str(sop or "unknown")
        raise UnusableImage(f"the instance has no pixel data (SOP class {name}); an image is needed")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnusableImage(f"multi-frame image ({frames} frames); a single-frame radiograph is needed")
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in GRAYSCALE:
        raise UnusableImage(
            f"colour or non-grayscale image (PhotometricInterpretation {photometric or 'missing'}, "
            f"{samples} samples per pixel); chest radiographs are MONOCHROME1/2"
        )
    try:
        pixels = ds.pixel_array
    except Exception as error:  # any decoder failure makes the image unusable; keep the reason
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or str(syntax or "unknown")
        raise UnusableImage(f"pixel data cannot be decoded (transfer syntax {name}): {error}") from error
    if pixels.ndim != 2:
        raise UnusableImage(f"unexpected pixel array shape {pixels.shape}; a 2-D image is needed")

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    values = _apply_voi(values, ds, apply_voi_lut)
    if photometric == "MONOCHROME1":
        # MONOCHROME1: low values are white; invert so bones are white like MIMIC-CXR-JPG. A Presentation LUT
        # Shape INVERSE is ignored on purpose: DX requires it with MONOCHROME1 for this same single inversion.
        values = -values
    return _to_uint8(values)


def _apply_voi(values: np.ndarray, ds, apply_voi_lut) -> np.ndarray:
    """VOI LUT sequence if present, else the first window; a broken VOI is skipped, not fatal."""
    has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if not (has_lut or has_window):
        return values
    try:
        return np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64)
    except (ValueError, TypeError, IndexError, AttributeError) as error:
        log.warning("VOI transform ignored", extra={"error": str(error)})
        return values


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max to 0..255 (as the reference's remap_to_uint8); a constant image carries no picture."""
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise UnusableImage("pixel values are not finite")
    if high <= low:
        raise UnusableImage("the image is blank (all pixels have the same value after windowing)")
    scaled = (values - low) / (high - low) * 255.0
    return scaled.astype(np.uint8)
