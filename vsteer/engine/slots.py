"""Slot allocation: which bank row holds which folded steering transform.

Slot 0 is the identity and never handed out. Slots are keyed by the content hash of the folded
transform, so identical configs share a row; a row stays resident after its requests leave and is
reused on a hit (LRU). Within a step every slot used by the batch is pinned: eviction only ever
takes a slot that no token of the current step uses (never borrow a slot in use).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from vsteer._errors import SlotCapacityError


class LRUSlotManager:
    """Content-hashed, LRU-evicted steering slots ``1..num_slots``.

    Example:
        >>> mgr = LRUSlotManager(num_slots=2, write=lambda slot, key: None)
        >>> mgr.begin_step(); mgr.acquire("a")
        1
    """

    def __init__(self, num_slots: int, write: Callable[[int, str], None]) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._write = write
        self._key_to_slot: "OrderedDict[str, int]" = OrderedDict()  # LRU order, oldest first
        self._free = list(range(num_slots, 0, -1))
        self._pinned: set[int] = set()
        self.loads = 0  # number of rows written (cache misses), for metrics and tests

    def begin_step(self) -> None:
        """Start a new step: nothing is pinned any more."""
        self._pinned.clear()

    def acquire(self, key: str) -> int:
        """Return the slot holding ``key`` for this step, loading it if needed.

        Semantics: slot = table[key] if resident else write(evict_lru_unpinned(), key).
        """
        slot = self._key_to_slot.get(key)
        if slot is not None:
            self._key_to_slot.move_to_end(key)
        else:
            slot = self._take_slot()
            self._write(slot, key)
            self._key_to_slot[key] = slot
            self.loads += 1
        self._pinned.add(slot)
        return slot

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for key, slot in self._key_to_slot.items():
            if slot not in self._pinned:
                del self._key_to_slot[key]
                return slot
        raise SlotCapacityError(requested=len(self._pinned) + 1, capacity=self.num_slots)

    @property
    def resident(self) -> dict[str, int]:
        return dict(self._key_to_slot)

    @property
    def pinned(self) -> int:
        """Slots used by the current step."""
        return len(self._pinned)

    @property
    def pinned_slots(self) -> frozenset[int]:
        return frozenset(self._pinned)
