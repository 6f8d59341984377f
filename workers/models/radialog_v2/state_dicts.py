"""Exact state-dict loading: every expected key present with its shape, nothing unexpected, or a clear error.

torch's ``load_state_dict(strict=True)`` raises on the first shape mismatch with a long message; we want
one message that names every problem, with the key names as they appear in the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from workers.models.radialog_v2.checkpoint_io import ModelFileError


class StateDictMismatch(ModelFileError):
    """Keys missing, unexpected, or of the wrong shape; ``missing``/``unexpected``/``mismatched`` name them."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if mismatched:
            parts.append(f"wrong shapes {_short(mismatched)}")
        super().__init__(f"{source}: " + "; ".join(parts))


def _short(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}] ({len(names)})"


def check_state_dict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    key_prefix: str = "",
    optional: Callable[[str], bool] = lambda key: False,
    ignore_unexpected: Iterable[str] = (),
) -> list[str]:
    """Raise :class:`StateDictMismatch` on any problem; return the optional keys that were absent.

    ``key_prefix`` is only used to show names as they are in the file.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not optional(k)]
    absent_optional = [k for k in expected if k not in state and optional(k)]
    ignored = tuple(ignore_unexpected)
    unexpected = [k for k in state if k not in expected and not (ignored and k.startswith(ignored))]
    mismatched = [
        f"{key_prefix}{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatch(
            source, [key_prefix + k for k in missing], [key_prefix + k for k in unexpected], mismatched
        )
    return absent_optional


def load_exact(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    key_prefix: str = "",
    optional: Callable[[str], bool] = lambda key: False,
) -> list[str]:
    """Check, then copy the tensors in (strict=False only because optional keys may be absent)."""
    absent = check_state_dict(module, state, source=source, key_prefix=key_prefix, optional=optional)
    module.load_state_dict(dict(state), strict=False)
    return absent
