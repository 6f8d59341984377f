"""Helpers for the node tests: a node on a free port, a recording pynetdicom SCU, spool inspection."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.server import RunningNode, start_node
from radialog.registry import Registry
from radialog.settings import Settings


@contextmanager
def running_node(settings: Settings, registry: Registry, **kwargs: Any) -> Iterator[RunningNode]:
    local = settings.model_copy(update={"dicom_host": "127.0.0.1", "dicom_port": 0})
    node = start_node(local, registry, **kwargs)
    try:
        yield node
    finally:
        node.stop()


def scu(contexts: Sequence[tuple[str, str]], ae_title: str = "TESTSCU") -> AE:
    """An SCU proposing one presentation context per (SOP class, transfer syntax) pair."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    ae.add_requested_context(Verification)
    return ae


def store_all(port: int, items: Sequence[Dataset | Path], *, called: str = "RADIALOG",
              calling: str = "TESTSCU") -> list[int | None]:
    """Send every item on one association; the status of each (None = no response)."""
    contexts = set()
    for item in items:
        if isinstance(item, Dataset):
            contexts.add((str(item.SOPClassUID), str(item.file_meta.TransferSyntaxUID)))
        else:
            meta, _ = split_dataset(item)
            contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    assoc = scu(sorted(contexts), calling).associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    statuses: list[int | None] = []
    try:
        for item in items:
            status = assoc.send_c_store(item)
            statuses.append(int(status.Status) if "Status" in status else None)
    finally:
        assoc.release()
    return statuses


def echo(port: int, called: str = "RADIALOG", calling: str = "TESTSCU") -> bool:
    assoc = scu([], calling).associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and status.Status == 0
    finally:
        assoc.release()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    _, offset = split_dataset(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


def save(ds: Dataset, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def wait_idle(node: RunningNode, limit: float = 30.0) -> None:
    """Wait until the node has no association left (a released one ends a moment after the peer's)."""
    import time

    deadline = time.monotonic() + limit
    while node.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
