"""``radialog`` with a test-only fault: the process dies of a real segmentation fault when the serving
engine admits the image of a listed study, as a buggy native kernel or codec would take a worker down.

    python -m tests.support.crashing_worker worker --hostname w1 ...   # then exactly ``radialog worker``

Which images crash: ``RADIALOG_TEST_CRASH_IMAGES``, comma-separated ``image_key`` values (SHA-256 of the
8-bit image the worker hands the engine). Only this launcher reads that variable; the product has no such
hook: a process started as ``radialog`` runs unpatched code. The fault strikes in the engine thread, while
the admitted group (and every other sequence of the process, from other report tasks too) is in flight.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

CRASH_IMAGES_ENV = "RADIALOG_TEST_CRASH_IMAGES"


def image_key(image: np.ndarray) -> str:
    """What the crash list names: the image's shape and bytes, hashed."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def install(crash_keys: set[str]) -> None:
    """Patch the engine class of this process so that admitting a listed image segfaults."""
    from workers.engine.engine import Engine

    doomed: weakref.WeakSet[Any] = weakref.WeakSet()  # handles of requests that must crash the process
    marks = threading.local()  # per submitting thread: is the next request put into the engine a listed one?
    submit_reports = Engine.submit_reports
    put = Engine._put
    admit_report_group = Engine._admit_report_group

    def submit_and_mark(self: Engine, images: Sequence[np.ndarray], **kwargs: Any) -> Any:
        marks.pending = [image_key(image) in crash_keys for image in images]
        try:
            return submit_reports(self, images, **kwargs)
        finally:
            marks.pending = []

    def put_marked(self: Engine, request: Any) -> None:
        pending = getattr(marks, "pending", [])
        if pending and pending.pop(0):  # marked before the engine thread can see the request
            doomed.add(request.handle)
        put(self, request)

    def admit_or_crash(self: Engine, requests: list[Any]) -> None:
        if any(request.handle in doomed for request in requests):
            ctypes.string_at(0)  # reads address 0: SIGSEGV, no Python exception, no cleanup
        admit_report_group(self, requests)

    Engine.submit_reports = submit_and_mark  # type: ignore[method-assign]
    Engine._put = put_marked  # type: ignore[method-assign]
    Engine._admit_report_group = admit_or_crash  # type: ignore[method-assign]


def main() -> None:
    keys = {key for key in os.environ.get(CRASH_IMAGES_ENV, "").split(",") if key}
    install(keys)
    from composition.cli import main as radialog_main

    radialog_main(prog_name="radialog")


if __name__ == "__main__":
    main()
