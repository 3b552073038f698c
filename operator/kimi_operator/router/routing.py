"""Which replica takes a request (pure).

Candidates are the replicas that can serve the target right now, as their engines say: the base
model only on shared replicas; an adapter only where the engine's own ``/v1/models`` lists it (an
expert adapter lists only on its dedicated replicas, which serve nothing else). Among candidates,
the one with the fewest requests in flight; with many, the better of two picked at random (the
power of two choices: nearly as good, without every router herding onto the same replica).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from kimi_operator.router.names import Target


@dataclasses.dataclass(frozen=True)
class Replica:
    name: str
    url: str
    ready: bool
    # The adapter a dedicated replica serves (every request there must use it); None: shared.
    expert: str | None
    listed: frozenset[str]
    in_flight: int = 0


def candidates(target: Target, replicas: Sequence[Replica]) -> list[Replica]:
    ready = [r for r in replicas if r.ready]
    if target.adapter is None:
        return [r for r in ready if r.expert is None]
    return [r for r in ready if target.adapter in r.listed and (r.expert is None or r.expert == target.adapter)]


def choose(found: Sequence[Replica], rng: random.Random, *, exclude: frozenset[str] = frozenset()) -> Replica | None:
    """The replica to try next (``exclude``: the ones a retry already tried)."""
    left = [r for r in found if r.name not in exclude]
    if not left:
        return None
    # Ties are broken at random: by name, an idle fleet (and every router) would pick one replica.
    if len(left) <= 2:
        return min(left, key=lambda r: (r.in_flight, rng.random()))
    a, b = rng.sample(left, 2)
    return min((a, b), key=lambda r: (r.in_flight, rng.random()))


def may_retry(*, connected: bool, status: int | None, sent_to_client: bool, not_here: bool = False) -> bool:
    """Another candidate may take the request only when nothing reached the client yet and this
    replica either could not be reached, answered 503 (starting, overloaded, adapter unloading), or
    answered that it does not hold the adapter (``not_here``: it lost it since it was listed)."""
    if sent_to_client:
        return False
    return not connected or status == 503 or not_here
