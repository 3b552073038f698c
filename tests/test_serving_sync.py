"""What an adapter agent asks its engine, as a table."""

from __future__ import annotations

import pytest

from kimi_operator.workloads.serve.sync import Action, Load, Unload, Want, actions

C = "/adapter-cache"


@pytest.mark.parametrize(
    ("desired", "listed", "refused", "expected"),
    [
        ({}, {}, set(), []),
        ({"a": Want(f"{C}/1")}, {"a": f"{C}/1"}, set(), []),
        ({"a": Want(f"{C}/1")}, {}, set(), [Load("a", f"{C}/1", False)]),
        ({"a": Want(f"{C}/1", pinned=True)}, {}, set(), [Load("a", f"{C}/1", True)]),
        # Removed from the plan: unloaded.
        ({}, {"a": f"{C}/1"}, set(), [Unload("a")]),
        # A newer export under the same name: unloaded, then loaded from its new files.
        ({"a": Want(f"{C}/2")}, {"a": f"{C}/1"}, set(), [Unload("a"), Load("a", f"{C}/2", False)]),
        # Refused before with these files: reported, not retried.
        ({"a": Want(f"{C}/1")}, {}, {("a", f"{C}/1")}, []),
        # Refused with old files, new files come: tried again.
        ({"a": Want(f"{C}/2")}, {}, {("a", f"{C}/1")}, [Load("a", f"{C}/2", False)]),
        # Unloads before loads, so a full pool makes room first.
        ({"b": Want(f"{C}/2")}, {"a": f"{C}/1"}, set(), [Unload("a"), Load("b", f"{C}/2", False)]),
        # An engine restarted empty: everything again.
        (
            {"a": Want(f"{C}/1"), "b": Want(f"{C}/2")},
            {},
            set(),
            [Load("a", f"{C}/1", False), Load("b", f"{C}/2", False)],
        ),
    ],
    ids=[
        "nothing",
        "in-sync",
        "load",
        "pinned",
        "unload",
        "new-export",
        "refused",
        "refused-then-new",
        "order",
        "restart",
    ],
)
def test_actions(
    desired: dict[str, Want], listed: dict[str, str], refused: set[tuple[str, str]], expected: list[Action]
) -> None:
    assert actions(desired, listed, refused) == expected


@pytest.mark.parametrize(
    ("want", "pinned_as", "expected"),
    [
        (Want(f"{C}/1", pinned=True), {"a": False}, [Unload("a"), Load("a", f"{C}/1", True)]),
        (Want(f"{C}/1", pinned=False), {"a": True}, [Unload("a"), Load("a", f"{C}/1", False)]),
        (Want(f"{C}/1", pinned=True), {"a": True}, []),
        # Loaded before this agent started: how is unknown, and taken to be as wanted.
        (Want(f"{C}/1", pinned=True), {}, []),
    ],
    ids=["pinned-since", "unpinned-since", "same", "unknown"],
)
def test_a_change_of_pinned_loads_the_adapter_again(
    want: Want, pinned_as: dict[str, bool], expected: list[Action]
) -> None:
    assert actions({"a": want}, {"a": f"{C}/1"}, set(), pinned_as) == expected
