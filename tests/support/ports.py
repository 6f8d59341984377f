"""Free TCP ports for servers a test starts (Orthanc, an API subprocess, a node on a fixed port).

The one implementation is the product's: ``composition.chain`` (the local chain and ``radialog demo``)
needs it too, and bench imports it from there, so tests, bench and the chain agree on it."""

from __future__ import annotations

from composition.chain import free_port

__all__ = ["free_port"]
