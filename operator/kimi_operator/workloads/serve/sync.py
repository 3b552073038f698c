"""What an agent must ask its engine to do, from the plan and the engine's own listing (pure).

Unloads come first, so a full pool has room for the loads that follow. An adapter whose files
changed (a newer export: another digest, so another cache path) is unloaded and loaded again under
the same name, without restarting the engine. A load the engine refused is not retried with the
same files until the engine restarts: the refusal is reported instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Set


@dataclasses.dataclass(frozen=True)
class Want:
    path: str
    pinned: bool = False


@dataclasses.dataclass(frozen=True)
class Load:
    name: str
    path: str
    pinned: bool


@dataclasses.dataclass(frozen=True)
class Unload:
    name: str


Action = Load | Unload


def actions(
    desired: Mapping[str, Want],
    listed: Mapping[str, str],
    refused: Set[tuple[str, str]] = frozenset(),
    pinned_as: Mapping[str, bool] | None = None,
) -> list[Action]:
    """``pinned_as``: how this agent loaded each adapter (the engine's listing does not say): an
    adapter pinned or unpinned since is loaded again with the new setting."""
    pinned_as = pinned_as or {}
    unloads: list[Action] = [Unload(n) for n in sorted(listed) if n not in desired]
    loads: list[Action] = []
    for name in sorted(desired):
        want = desired[name]
        if listed.get(name) == want.path and pinned_as.get(name, want.pinned) == want.pinned:
            continue
        if name in listed:
            unloads.append(Unload(name))
        if (name, want.path) not in refused:
            loads.append(Load(name, want.path, want.pinned))
    return unloads + loads
