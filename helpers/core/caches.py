"""The process's in-memory caches, all in one place: each is named, bounded, and emptied by `clear_all()`.

They live here rather than with one object because their users only hold a config: every runner calls
`load_data(config, device)`, and a grid of head-only runs shares backbone features, so the process is the owner.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class Cache:
    """At most `entries` values by key; the least recently used goes first. Values are shared: only NODES' model
    is modified (by each client it trains, which reloads the round's weights first)."""

    def __init__(self, name: str, entries: int):
        self.name, self.entries = name, entries
        self.items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value under `key`, made by `make()` (and kept) on a miss."""
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        while len(self.items) > self.entries:
            self.items.popitem(last=False)
        return value

    def clear(self) -> None:
        self.items.clear()

    def __len__(self) -> int:
        return len(self.items)


DATA = Cache("data splits by (data config, device): a grid of runs loads them once", 2)
FEATURES = Cache(
    "backbone features by feature key (helpers.training.features): a grid of head-only runs shares them", 6
)
NORMALIZATION = Cache("ImageNet mean and std tensors by device: rebuilding them per batch costs a batch", 8)
NODES = Cache("a Flower node's data, model and client shards by config: the nodes one process serves share them", 1)


def clear_all() -> None:
    """Empty every cache (tests; or to free memory in a long notebook session)."""
    for cache in (DATA, FEATURES, NORMALIZATION, NODES):
        cache.clear()
