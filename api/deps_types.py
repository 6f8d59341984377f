"""Small value types shared by the dependencies, the audit log and the routes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: the ``ApiKey`` row's name and role."""

    name: str
    role: str
