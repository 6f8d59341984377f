"""Pre-allocated key/value memory for a fixed number of sequences ("slots") of a bounded length.

One pool per kind of request (reports: many short slots; dialog: a few long ones), so a dialog's 4,000
tokens of context do not set the length of every report slot. Live sequences are kept in slots
``0..n-1`` (a finished sequence's slot is filled by moving the last one down), so a decode step
attends over plain views ``k[layer, :n, :, :length]``: no gather, no copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PoolShape:
    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Keys + values of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """``slots`` sequences of at most ``max_len`` tokens each, allocated once."""

    def __init__(
        self, name: str, shape: PoolShape, slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ):
        if slots < 1 or max_len < 2:
            raise ValueError(f"pool {name!r} needs at least one slot of two tokens (got {slots} x {max_len})")
        self.name, self.shape, self.slots, self.max_len = name, shape, slots, max_len
        size = (shape.layers, slots, shape.kv_heads, max_len, shape.head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)
        self.used = 0  # slots 0..used-1 hold live sequences

    @property
    def free(self) -> int:
        return self.slots - self.used

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def take(self, count: int) -> list[int]:
        """The next ``count`` slots (appended after the live ones)."""
        if count > self.free:
            raise RuntimeError(f"pool {self.name!r} has {self.free} free slots, {count} asked")
        slots = list(range(self.used, self.used + count))
        self.used += count
        return slots

    def release(self, slot: int, last_length: int) -> int | None:
        """Free ``slot``; the last live sequence moves into it. Returns the slot that moved (or None).

        ``last_length``: tokens held by the sequence in the last slot (only those are copied).
        """
        last = self.used - 1
        if not 0 <= slot <= last:
            raise ValueError(f"slot {slot} is not live in pool {self.name!r}")
        self.used -= 1
        if slot == last:
            return None
        if last_length:
            self.k[:, slot, :, :last_length] = self.k[:, last, :, :last_length]
            self.v[:, slot, :, :last_length] = self.v[:, last, :, :last_length]
        return last
