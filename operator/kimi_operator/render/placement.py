"""Which shared replicas hold which shared adapters (pure).

While every shared adapter fits in a replica's pool (``capacity``, SGLang's --max-loaded-loras),
every adapter is on every shared replica: any replica can serve any request. Beyond that, pinned
adapters stay on every replica and each other adapter goes to ``per_adapter`` replicas chosen by
rendezvous (highest-random-weight) hashing of (adapter, replica): adding a replica moves only the
adapters that now rank it first, so scaling reloads few adapters. A replica never gets more than
``capacity`` adapters; an adapter that finds no room anywhere is placed nowhere, and its status
says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Shared:
    name: str
    pinned: bool = False


def _score(adapter: str, replica: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{adapter}\x00{replica}".encode()).digest()[:8], "big")


def rank(adapter: str, replicas: Sequence[str]) -> list[str]:
    """Replicas in the adapter's rendezvous order (most preferred first)."""
    return sorted(replicas, key=lambda r: (-_score(adapter, r), r))


def place(
    adapters: Sequence[Shared], replicas: Sequence[str], *, capacity: int, per_adapter: int
) -> dict[str, list[str]]:
    """adapter name -> the replicas it must be loaded on (in replica order)."""
    if not replicas:
        return {a.name: [] for a in adapters}
    if len(adapters) <= capacity:
        return {a.name: list(replicas) for a in adapters}
    load = dict.fromkeys(replicas, 0)
    placed: dict[str, list[str]] = {}
    # Pinned first (they are everywhere), then the rest in name order so the result does not
    # depend on the order of the spec's list.
    for adapter in sorted(adapters, key=lambda a: (not a.pinned, a.name)):
        wanted = len(replicas) if adapter.pinned else min(per_adapter, len(replicas))
        chosen = [r for r in rank(adapter.name, replicas) if load[r] < capacity][:wanted]
        for replica in chosen:
            load[replica] += 1
        placed[adapter.name] = [r for r in replicas if r in chosen]
    return {a.name: placed[a.name] for a in adapters}
