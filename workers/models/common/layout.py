"""Checking a checkpoint against the layout a model expects, in the checkpoint's own key names.

The reference code loads every file with ``strict=False``: a missing, extra or mis-shaped tensor passes
without a word and the model runs with random weights there. Here every one is named, by the name it has
(or should have) in the file, and the load is refused; keys the reference does not use are ignored only
when a rule names them, and returned so the caller can say so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from workers.models.radialog_v2.state_dicts import StateDictMismatch


def check_layout(
    source: str,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, torch.Tensor],
    ignored: Callable[[str], bool] = lambda key: False,
) -> list[str]:
    """Raise :class:`StateDictMismatch` unless ``found`` holds exactly ``expected`` (names and shapes) plus
    keys ``ignored`` accepts; returns those ignored keys."""
    skipped = sorted(k for k in found if k not in expected and ignored(k))
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not ignored(k))
    mismatched = [
        f"{k} {tuple(found[k].shape)} != {tuple(shape)}"
        for k, shape in expected.items()
        if k in found and isinstance(found[k], torch.Tensor) and tuple(found[k].shape) != tuple(shape)
    ]
    mismatched += [
        f"{k} is a {type(found[k]).__name__}, not a tensor"
        for k in expected
        if k in found and not isinstance(found[k], torch.Tensor)
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatch(source, missing, unexpected, mismatched)
    return skipped
