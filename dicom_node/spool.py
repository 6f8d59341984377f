"""The durable spool: ``<spool>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, each file as it arrived.

A file reaches its final name only through :func:`commit_file`: bytes go to a temp file under
``<spool>/.incoming``, are fsynced, renamed atomically into place, and the directory entry is fsynced.
So a final name always holds a complete file, whatever moment the process or machine dies; only temp
files can be half-written, and :func:`remove_partial_files` deletes them at start-up.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from radialog.uids import require_uid

INCOMING = ".incoming"
SUFFIX = ".dcm"


def relative_path(study_uid: str, sop_instance_uid: str) -> str:
    """The spool-relative path of one instance (``Instance.path``); both UIDs are validated first."""
    require_uid(study_uid, "Study Instance UID")
    require_uid(sop_instance_uid, "SOP Instance UID")
    return f"{study_uid}/{sop_instance_uid}{SUFFIX}"


def free_bytes(spool_dir: Path) -> int:
    """Free space on the spool's file system."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(spool_dir).free


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(spool_dir: Path, chunks: Iterable[bytes | memoryview]) -> Path:
    """Write ``chunks`` to a new fsynced temp file in the spool's incoming directory; return its path."""
    incoming = spool_dir / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=incoming, suffix=".part")
    try:
        with os.fdopen(fd, "wb", buffering=0) as fh:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = fh.write(view)
                    view = view[written:]
            os.fdatasync(fh.fileno())  # data + size; the rename is made durable by the directory fsync
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


@functools.lru_cache(maxsize=4096)
def _fsync_entry_once(directory: Path, inode: int) -> None:
    """Make a study directory's entry in the spool durable, once per directory (and inode) and process.

    Not only when this call created it: a second association that finds the directory a first one made,
    before that one fsynced the entry, must not answer Success before the entry is durable.
    """
    _fsync_dir(directory.parent)


def commit_file(spool_dir: Path, temp: Path, rel_path: str) -> Path:
    """Atomically move a fsynced temp file to its final spool path and make the rename durable."""
    final = spool_dir / rel_path
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _fsync_entry_once(parent, parent.stat().st_ino)
    os.replace(temp, final)
    _fsync_dir(parent)
    return final


def remove_partial_files(spool_dir: Path) -> int:
    """Delete half-written temp files left by a crash; returns how many were removed."""
    incoming = spool_dir / INCOMING
    if not incoming.is_dir():
        return 0
    removed = 0
    for entry in incoming.iterdir():
        if entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def spooled_files(spool_dir: Path) -> Iterator[str]:
    """Spool-relative paths of every committed instance file (temp files excluded)."""
    if not spool_dir.is_dir():
        return
    for study_dir in os.scandir(spool_dir):
        if not study_dir.is_dir() or study_dir.name == INCOMING:
            continue
        for entry in os.scandir(study_dir.path):
            if entry.name.endswith(SUFFIX) and entry.is_file():
                yield f"{study_dir.name}/{entry.name}"
