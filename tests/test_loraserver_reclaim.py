"""Which node cache entries a deleted LoraServer may remove: only the digests no other LoraServer
asks for or has loaded (the cache is shared by every LoraServer on a node, keyed by digest)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from kimi_operator.controller.loraserver import reclaimable

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def server(
    uid: str, *, spec: Sequence[str] = (), status: Sequence[str] = (), loaded: Sequence[str] = ()
) -> dict[str, Any]:
    return {
        "metadata": {"uid": uid},
        "spec": {"adapters": [{"name": f"s{i}", "sha256": d} for i, d in enumerate(spec)]},
        "status": {
            "adapters": [{"name": f"t{i}", "sha256": d} for i, d in enumerate(status)],
            "engines": [{"name": "r0", "loadedSha256": {f"l{i}": d for i, d in enumerate(loaded)}}],
        },
    }


@pytest.mark.parametrize(
    ("me", "others", "removed"),
    [
        (server("1", spec=[A, B]), [], [A, B]),
        # Another server asks for B: it stays.
        (server("1", spec=[A, B]), [server("2", spec=[B])], [A]),
        # Another server's engine still holds C (an older export it serves): it stays.
        (server("1", status=[C]), [server("2", loaded=[C])], []),
        # What this server's engines loaded counts as its own, even when the spec moved on.
        (server("1", spec=[A], loaded=[D]), [], [A, D]),
        # The list of servers includes this one: it never protects its own digests.
        (server("1", spec=[A]), [server("1", spec=[A])], [A]),
        # Not a digest: never a path to remove.
        (server("1", spec=["../../etc"]), [], []),
    ],
    ids=["alone", "shared-spec", "shared-loaded", "own-loaded", "self-listed", "not-a-digest"],
)
def test_only_digests_no_other_server_uses_are_reclaimed(
    me: dict[str, Any], others: list[dict[str, Any]], removed: list[str]
) -> None:
    assert reclaimable(me, others) == removed
