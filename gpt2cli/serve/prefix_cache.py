"""Finished requests' KV caches, kept so a later prompt with the same start skips reading it.

When a request ends, the tokens its row holds (prompt and reply) and a copy of their keys and
values are kept here; a new prompt starts from the kept entry sharing its longest token prefix
and prefills only the rest. A chat client sending its whole history each turn then reads only
the new message, and requests with one system prompt read it once.

Entries are bounded by bytes, least recently used out first (mlx-lm's `LRUPromptCache` keeps
a trie of prompts bounded by count and bytes; llama-server keeps each slot's last prompt). A
linear scan finds the longest common prefix, which also matches an entry that diverges from
the prompt after a shared system prompt. An entry that is a prefix of a new one is dropped:
the new one answers every lookup it would. The values are opaque here (the scheduler keeps
one-row KV caches); `release` frees one at eviction.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray  # [n] int32: the tokens whose keys and values `value` holds
    value: Any
    nbytes: int


class PrefixCache:
    """A bounded LRU of token sequences and their KV caches. One thread uses it (the engine's);
    `nbytes` and `entries` may be read from any."""

    def __init__(self, budget: int, release: Callable[[Any], None] = lambda value: None):
        self.budget = budget  # bytes; 0 keeps nothing
        self.release = release
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # oldest first
        self._keys = itertools.count()
        self.nbytes = 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `prompt` and that prefix's length (None, 0
        when none shares a token). A found entry becomes the most recently used."""
        ids = np.asarray(prompt, np.int32)
        best, best_n = None, 0
        for key, entry in self._entries.items():
            n = common_prefix(entry.tokens, ids)
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        return self._entries[best], best_n

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.budget

    def covered(self, tokens: Sequence[int]) -> bool:
        """Whether a kept entry already starts with `tokens` (keeping them would add nothing);
        that entry becomes the most recently used."""
        ids = np.asarray(tokens, np.int32)
        for key, entry in self._entries.items():
            if len(entry.tokens) >= len(ids) and common_prefix(entry.tokens, ids) == len(ids):
                self._entries.move_to_end(key)
                return True
        return False

    def add(self, tokens: Sequence[int], value: Any, nbytes: int) -> None:
        """Keep `value` (the KV of `tokens`, `nbytes` bytes, which `fits`): entries that are
        prefixes of `tokens` go, then the least recently used until it fits the budget."""
        ids = np.asarray(tokens, np.int32)
        for key, entry in list(self._entries.items()):
            if len(entry.tokens) <= len(ids) and common_prefix(entry.tokens, ids) == len(
                entry.tokens
            ):
                self._drop(key)
        while self.nbytes + nbytes > self.budget:
            self._drop(next(iter(self._entries)))
        self._entries[next(self._keys)] = Entry(ids, value, nbytes)
        self.nbytes += nbytes

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        self.release(entry.value)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two id arrays share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
