"""The streamed spool file is used only when it matches pynetdicom's in-memory copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_node.streaming import IncomingStreams, _Stream


@pytest.mark.parametrize(
    ("change", "same"),
    [
        (None, True),
        ("first byte", False),
        ("last byte", False),
        ("middle fragment doubled", False),
    ],
)
def test_sampled_comparison(tmp_path: Path, change: str | None, same: bool) -> None:
    data = bytearray(os.urandom(3 * 1024 * 1024 + 17))
    on_disk = bytearray(data)
    if change == "first byte":
        on_disk[0] ^= 1
    elif change == "last byte":
        on_disk[-1] ^= 1
    elif change == "middle fragment doubled":  # same length, content shifted after 1 MB
        on_disk[1 << 20 :] = on_disk[(1 << 20) - 16384 : len(on_disk) - 16384]
    path = tmp_path / "x.part"
    path.write_bytes(b"H" * 200 + on_disk)
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = _Stream(fd=fd, path=path, header_size=200, written=len(data), complete=True)
        assert IncomingStreams._same(stream, memoryview(bytes(data))) is same
    finally:
        os.close(fd)
