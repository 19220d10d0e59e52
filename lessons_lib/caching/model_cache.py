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

from ..validate import bad, check_choice, check_int, check_str, check_str_list

POLICIES = ("lru", "lfu")


def module_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


class ModelCache:
    """Models by name, loaded on a miss by ``loader(name)``, within ``budget_bytes``.

    ``size_of(model)`` says how many bytes a model costs (default: its parameters
    and buffers). ``events`` records ("hit" | "load" | "evict", name) in order.
    A load that fails (the loader raises, or the model exceeds the whole budget)
    leaves the cache, its counts and its events as they were.
    """

    def __init__(self, loader: Callable[[str], nn.Module], budget_bytes: int, policy: str = "lru",
                 size_of: Callable[[nn.Module], int] = module_bytes) -> None:
        check_choice("policy", policy, POLICIES)
        check_int("budget_bytes", budget_bytes, low=1)
        for name, fn in (("loader", loader), ("size_of", size_of)):
            if not callable(fn):
                raise bad(name, fn, "a function")
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
        check_str("name", name)
        if name in self.entries:
            self.hits += 1
            self.entries.move_to_end(name)
            self.events.append(("hit", name))
            model = self.entries[name]
        else:
            model = self._load(name)        # the victim is chosen among the others: counting
            self.misses += 1                # this request after the load changes no choice
        self.counts[name] = self.counts.get(name, 0) + 1
        return model

    def warm_up(self, names: list[str]) -> list[float]:
        """Load ``names`` ahead of traffic (not counted as requests); return each load's seconds.

        The models before one that fails to load stay loaded.
        """
        seconds = []
        for name in check_str_list("names", names, allow_empty=True):
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
        """Load ``name`` and make room for it; everything that can fail happens before any eviction."""
        model = self.loader(name)
        size = check_int(f"size_of({name!r})", self.size_of(model), low=0)
        if size > self.budget_bytes:
            raise bad("budget_bytes", self.budget_bytes, f"at least {size}",
                      f"smaller than model {name!r} ({size} bytes)")
        while self.used_bytes + size > self.budget_bytes:
            evicted = self.victim()
            del self.entries[evicted], self.sizes[evicted]
            self.events.append(("evict", evicted))
        self.entries[name], self.sizes[name] = model, size
        self.events.append(("load", name))
        return model
