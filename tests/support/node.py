"""The DICOM node in a test: started in-process on a free port, and waited on until it is idle."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dicom_node.server import RunningNode, start_node
from radialog.registry import Registry
from radialog.settings import Settings
from tests.support.polling import wait_for


@contextmanager
def running_node(settings: Settings, registry: Registry, **kwargs: Any) -> Iterator[RunningNode]:
    """``start_node`` on 127.0.0.1 and a port the system picks; stopped afterwards."""
    local = settings.model_copy(update={"dicom_host": "127.0.0.1", "dicom_port": 0})
    node = start_node(local, registry, **kwargs)
    try:
        yield node
    finally:
        node.stop()


def wait_idle(node: RunningNode, limit: float = 30.0) -> None:
    """Wait until the node has no association left (a released one ends a moment after the peer's)."""
    wait_for(
        lambda: not node.ae.active_associations, what="the node to have no association", timeout=limit, interval=0.02
    )
