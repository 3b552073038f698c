"""Placement of shared adapters on shared replicas, as tables."""

from __future__ import annotations

import pytest

from kimi_operator.render.placement import Shared, place, rank

R3 = ["s-0", "s-1", "s-2"]


def shared(*names: str, pinned: tuple[str, ...] = ()) -> list[Shared]:
    return [Shared(n, pinned=n in pinned) for n in names]


@pytest.mark.parametrize(
    ("adapters", "replicas", "capacity", "per_adapter", "expected"),
    [
        # No replica: nothing is placed.
        (shared("a"), [], 4, 2, {"a": []}),
        # Everything fits: every adapter everywhere, whatever per_adapter says.
        (shared("a", "b"), R3, 2, 1, {"a": R3, "b": R3}),
        (shared("a", "b", "c"), R3, 8, 2, {"a": R3, "b": R3, "c": R3}),
        # One replica with room for all.
        (shared("a", "b"), ["s-0"], 2, 2, {"a": ["s-0"], "b": ["s-0"]}),
    ],
    ids=["no-replicas", "fits-exactly", "fits", "one-replica"],
)
def test_while_everything_fits_every_adapter_is_everywhere(
    adapters: list[Shared], replicas: list[str], capacity: int, per_adapter: int, expected: dict[str, list[str]]
) -> None:
    assert place(adapters, replicas, capacity=capacity, per_adapter=per_adapter) == expected


def test_beyond_capacity_each_goes_to_k_replicas_in_rendezvous_order() -> None:
    adapters = shared(*(f"a{i}" for i in range(6)))
    placed = place(adapters, R3, capacity=5, per_adapter=2)
    for name, replicas in placed.items():
        assert len(replicas) == 2, (name, replicas)
        assert set(replicas) <= set(R3)
    load = {r: sum(r in v for v in placed.values()) for r in R3}
    assert max(load.values()) <= 5
    assert sum(load.values()) == 12


def test_a_full_replica_is_skipped_for_the_next_in_rendezvous_order() -> None:
    # Exactly as many slots as needed: greedy filling may leave a late adapter on fewer replicas,
    # never on more than capacity allows.
    placed = place(shared(*(f"a{i}" for i in range(6))), R3, capacity=4, per_adapter=2)
    load = {r: sum(r in v for v in placed.values()) for r in R3}
    assert max(load.values()) <= 4
    assert all(1 <= len(v) <= 2 for v in placed.values())


def test_pinned_adapters_are_on_every_replica_even_when_crowded() -> None:
    adapters = shared("p", "a", "b", "c", "d", pinned=("p",))
    placed = place(adapters, R3, capacity=2, per_adapter=1)
    assert placed["p"] == R3
    assert all(len(placed[n]) == 1 for n in "abcd" if placed[n])
    # One slot left per replica after the pinned one: three of the four fit, one is placed nowhere.
    assert sorted(len(placed[n]) for n in "abcd") == [0, 1, 1, 1]


def test_an_adapter_with_no_room_is_placed_nowhere() -> None:
    placed = place(shared("a", "b", "c"), ["s-0"], capacity=2, per_adapter=1)
    assert sorted(len(v) for v in placed.values()) == [0, 1, 1]


def test_the_order_of_the_spec_list_does_not_matter() -> None:
    names = [f"x{i}" for i in range(10)]
    one = place(shared(*names), R3, capacity=5, per_adapter=1)
    other = place(shared(*reversed(names)), R3, capacity=5, per_adapter=1)
    assert one == other


def test_scaling_up_moves_few_adapters() -> None:
    names = [f"adapter-{i}" for i in range(40)]
    # 40 adapters over a capacity of 39: the hashed path, with room to spare on every replica.
    before = place(shared(*names), [f"s-{i}" for i in range(4)], capacity=39, per_adapter=1)
    after = place(shared(*names), [f"s-{i}" for i in range(5)], capacity=39, per_adapter=1)
    moved = sum(before[n] != after[n] for n in names)
    # Rendezvous hashing moves about 1/5 of them to the new replica, never a reshuffle.
    assert moved <= 40 // 5 + 6, moved
    assert all(after[n] == ["s-4"] for n in names if before[n] != after[n])


def test_rank_is_a_stable_permutation() -> None:
    assert sorted(rank("a", R3)) == sorted(R3)
    assert rank("a", R3) == rank("a", list(reversed(R3)))
