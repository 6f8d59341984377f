"""DICOM files in tests: writing one, reading its encoded dataset back, and dicom3tools' verdict on it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.dsutils import split_dataset


def save(ds: Dataset, directory: Path, name: str) -> Path:
    """``ds`` as a Part 10 file ``directory/<name>.dcm``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    _, offset = split_dataset(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' verdict: every line starting with 'Error' (warnings are allowed)."""
    result = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
