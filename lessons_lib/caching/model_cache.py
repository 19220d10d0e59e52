"""A model cache: keep recently used models in memory within a byte budget.

A serving node that hosts more models (or adapters, or quantised variants) than
fit in its memory must load some on demand. Loading from disk costs far more than
a request, so the node keeps models resident and, when a new one does not fit,
evicts one chosen by a policy:

* **LRU** (least recently used): evict the model whose last request is oldest;
  good when popularity drifts over time.
* **LFU** (least frequently used): evict the model with the fewest requests
  (ties broken by LRU); good when a few models stay popular, but slow to forget a
  model that was popular once.

**Warm-up** loads the expected models before traffic arrives, so the first
request does not pay the cold load (the "cold start").
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

import torch.nn as nn

POLICIES = ("lru", "lfu")


def module_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


class ModelCache:
    """Models by name, loaded on a miss by ``loader(name)``, within ``budget_bytes``.

    ``size_of(model)`` says how many bytes a model costs (default: its parameters
    and buffers). ``events`` records ("hit" | "load" | "evict", name) in order.
    """

    def __init__(self, loader: Callable[[str], nn.Module], budget_bytes: int, policy: str = "lru",
                 size_of: Callable[[nn.Module], int] = module_bytes) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}; choose one of {POLICIES}")
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ValueError(f"budget_bytes={budget_bytes!r} must be a positive integer")
        self.loader, self.budget_bytes, self.policy, self.size_of = loader, budget_bytes, policy, size_of
        self.entries: OrderedDict[str, nn.Module] = OrderedDict()   # least recently used first
        self.sizes: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.events: list[tuple[str, str]] = []
        self.hits = self.misses = 0

    @property
    def used_bytes(self) -> int:
        return sum(self.sizes.values())

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> nn.Module:
        """The model ``name``, from memory if resident, else loaded (evicting as needed)."""
        self.counts[name] = self.counts.get(name, 0) + 1
        if name in self.entries:
            self.hits += 1
            self.entries.move_to_end(name)
            self.events.append(("hit", name))
            return self.entries[name]
        self.misses += 1
        return self._load(name)

    def warm_up(self, names: list[str]) -> list[float]:
        """Load ``names`` ahead of traffic (not counted as requests); return each load's seconds."""
        seconds = []
        for name in names:
            if name not in self.entries:
                start = time.perf_counter()
                self._load(name)
                seconds.append(time.perf_counter() - start)
        return seconds

    def victim(self) -> str:
        """The name the policy would evict next."""
        if self.policy == "lru":
            return next(iter(self.entries))
        # min() keeps the first of equal counts, and entries are in LRU order: ties go LRU.
        return min(self.entries, key=lambda name: self.counts.get(name, 0))

    def _load(self, name: str) -> nn.Module:
        model = self.loader(name)
        size = self.size_of(model)
        if size > self.budget_bytes:
            raise ValueError(f"budget_bytes={self.budget_bytes} is smaller than model {name!r} "
                             f"({size} bytes): choose budget_bytes >= {size}")
        while self.used_bytes + size > self.budget_bytes:
            evicted = self.victim()
            del self.entries[evicted], self.sizes[evicted]
            self.events.append(("evict", evicted))
        self.entries[name], self.sizes[name] = model, size
        self.events.append(("load", name))
        return model
