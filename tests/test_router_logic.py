"""The router's pure logic as tables: names, candidates, least outstanding, retry eligibility, key
scopes, sampling defaults."""

from __future__ import annotations

import random

import pytest

from kimi_operator.router.config import RouterConfig
from kimi_operator.router.defaults import merged
from kimi_operator.router.fleet import lora_listing
from kimi_operator.router.keys import Scope, bearer, verdict
from kimi_operator.router.names import BASE, Target, resolve
from kimi_operator.router.routing import Replica, candidates, choose, may_retry

SERVED = "kimi-k2.5"
ADAPTERS = {"support", "legal"}


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("kimi-k2.5", BASE),
        ("kimi-k2.5:support", Target("support")),
        # The bare name every OpenAI tool sends: the adapter, never silently the base model.
        ("support", Target("support")),
        ("legal", Target("legal")),
        # Removed from the LoraServer (SGLang would still reload it): refused here.
        ("kimi-k2.5:retired", None),
        ("retired", None),
        # Another base before the colon is another model.
        ("other:support", None),
        ("kimi-k2.5:", None),
        ("", None),
        (None, None),
        (42, None),
    ],
    ids=[
        "base",
        "served-adapter",
        "bare",
        "bare-2",
        "removed",
        "removed-bare",
        "other-base",
        "empty-adapter",
        "empty",
        "none",
        "int",
    ],
)
def test_names(model: object, expected: Target | None) -> None:
    assert resolve(model, served=SERVED, adapters=ADAPTERS) == expected


def test_sglang_is_never_sent_a_bare_adapter_name() -> None:
    assert Target("support").upstream(SERVED) == "kimi-k2.5:support"
    assert BASE.upstream(SERVED) == "kimi-k2.5"


def replica(name: str, *listed: str, expert: str | None = None, ready: bool = True, in_flight: int = 0) -> Replica:
    return Replica(name, f"http://{name}", ready, expert, frozenset(listed), in_flight)


REPLICAS = [
    replica("s0", "support", "legal"),
    replica("s1", "support"),
    replica("s2", "support", "legal", ready=False),
    replica("x0", "deep", expert="deep"),
]


@pytest.mark.parametrize(
    ("target", "names"),
    [
        # Base requests only where the base model runs alone: never on an expert replica.
        (BASE, ["s0", "s1"]),
        # Where the engine lists it, and ready.
        (Target("legal"), ["s0"]),
        (Target("support"), ["s0", "s1"]),
        # An expert adapter only on its own replicas.
        (Target("deep"), ["x0"]),
        # Listed nowhere yet: no candidate (the service answers 503 with the adapter's state).
        (Target("fresh"), []),
    ],
    ids=["base", "adapter", "adapter-everywhere", "expert", "nowhere"],
)
def test_candidates(target: Target, names: list[str]) -> None:
    assert [r.name for r in candidates(target, REPLICAS)] == names


def test_a_dedicated_replica_serves_only_its_own_adapter() -> None:
    # A dedicated replica lists only its adapter; one listing something else is not for it.
    odd = [replica("x1", "support", expert="deep")]
    assert candidates(Target("support"), odd) == []


@pytest.mark.parametrize(
    ("found", "exclude", "chosen"),
    [
        ([replica("a", in_flight=3), replica("b", in_flight=1)], frozenset(), "b"),
        ([replica("a", in_flight=0), replica("b", in_flight=5)], frozenset({"a"}), "b"),
        ([replica("a")], frozenset({"a"}), None),
        ([], frozenset(), None),
    ],
    ids=["fewest", "retry-elsewhere", "all-tried", "none"],
)
def test_choose(found: list[Replica], exclude: frozenset[str], chosen: str | None) -> None:
    picked = choose(found, random.Random(0), exclude=exclude)  # noqa: S311 (load spreading, not secrets)
    assert (picked.name if picked else None) == chosen


def test_with_many_candidates_the_busiest_is_never_chosen() -> None:
    many = [replica(f"r{i}", in_flight=i) for i in range(6)]
    rng = random.Random(7)  # noqa: S311 (load spreading, not secrets)
    picks = [choose(many, rng) for _ in range(500)]
    names = {p.name for p in picks if p is not None}
    assert "r5" not in names  # the better of two random ones is never the worst
    assert "r0" in names


@pytest.mark.parametrize(
    ("connected", "status", "sent", "not_here", "retry"),
    [
        (False, None, False, False, True),
        (True, 503, False, False, True),
        (True, 500, False, False, False),
        (True, 400, False, False, False),
        # "never been loaded": the engine lost the adapter since it listed it.
        (True, 400, False, True, True),
        (True, 200, True, False, False),
        # After a byte reached the client, never: the client would see two answers.
        (True, 503, True, False, False),
        (False, None, True, False, False),
    ],
    ids=["refused", "503", "500", "400", "lost-adapter", "answered", "503-after-bytes", "dropped-mid-stream"],
)
def test_retry_eligibility(connected: bool, status: int | None, sent: bool, not_here: bool, retry: bool) -> None:
    assert may_retry(connected=connected, status=status, sent_to_client=sent, not_here=not_here) is retry


KEYS = {
    "sk-all": Scope("team-a", base=True, adapters=frozenset(), all_adapters=True),
    "sk-support": Scope("support-desk", base=False, adapters=frozenset({"support"})),
    "sk-base": Scope("research", base=True, adapters=frozenset()),
}


@pytest.mark.parametrize(
    ("header", "target", "status", "key_id"),
    [
        (None, BASE, 401, None),
        ("Bearer nope", BASE, 401, None),
        ("Basic sk-all", BASE, 401, None),
        ("Bearer ", BASE, 401, None),
        ("Bearer sk-all", Target("legal"), 200, "team-a"),
        ("bearer sk-support", Target("support"), 200, "support-desk"),
        ("Bearer sk-support", Target("legal"), 403, "support-desk"),
        ("Bearer sk-support", BASE, 403, "support-desk"),
        ("Bearer sk-base", BASE, 200, "research"),
        ("Bearer sk-base", Target("support"), 403, "research"),
    ],
    ids=["none", "wrong", "not-bearer", "empty", "all", "scoped", "other-adapter", "no-base", "base", "base-only"],
)
def test_key_scopes(header: str | None, target: Target, status: int, key_id: str | None) -> None:
    code, scope = verdict(header, KEYS, target)
    assert code == status
    assert (scope.key_id if scope else None) == key_id


def test_without_keys_the_server_is_open() -> None:
    assert verdict(None, {}, BASE) == (200, None)
    # Keys configured but none readable: closed, not open.
    assert verdict(None, {}, BASE, required=True) == (401, None)
    assert verdict("Bearer anything", {}, BASE, required=True) == (401, None)


def test_bearer() -> None:
    assert bearer("Bearer  abc ") == "abc"
    assert bearer("Token abc") is None


@pytest.mark.parametrize(
    ("body", "defaults", "expected"),
    [
        ({"model": "m"}, {"temperature": 1.0, "top_p": 0.95}, {"model": "m", "temperature": 1.0, "top_p": 0.95}),
        # The client's value wins, even a null one.
        ({"temperature": 0.2}, {"temperature": 1.0}, {"temperature": 0.2}),
        ({"temperature": None}, {"temperature": 1.0}, {"temperature": None}),
        # No default: nothing added.
        ({}, {"temperature": None}, {}),
    ],
    ids=["added", "client-wins", "client-null", "no-default"],
)
def test_defaults_merge(body: dict[str, object], defaults: dict[str, object], expected: dict[str, object]) -> None:
    assert merged(body, defaults) == expected


def test_ties_are_spread_not_sent_to_one_replica() -> None:
    idle = [replica("a"), replica("b")]
    rng = random.Random(3)  # noqa: S311 (load spreading, not secrets)
    picks = {choose(idle, rng).name for _ in range(50)}  # type: ignore[union-attr]
    assert picks == {"a", "b"}


SHA_A, SHA_B = "a" * 64, "b" * 64


def test_llama_server_adapters_are_known_by_their_files_digest_directory() -> None:

    config = RouterConfig(
        served=SERVED, adapters=frozenset({"support", "legal"}), defaults={}, digests={SHA_A: "support", SHA_B: "legal"}
    )
    assert config.adapter_of_file(f"/adapter-cache/{SHA_A}/adapter.gguf") == "support"
    assert config.adapter_of_file(f"/adapter-cache/{SHA_B}/gguf/adapter.gguf") == "legal"
    # The file name itself is never taken for a digest directory, and an unknown digest is nobody.
    assert config.adapter_of_file(f"/x/{SHA_A}") is None
    assert config.adapter_of_file("/adapter-cache/" + "c" * 64 + "/adapter.gguf") is None
    listed = [
        {"id": 0, "path": f"/adapter-cache/{SHA_A}/adapter.gguf", "scale": 0.0},
        {"id": 1, "path": "/elsewhere/unknown.gguf", "scale": 0.0},
        {"id": 2, "path": f"/adapter-cache/{SHA_B}/adapter.gguf", "scale": 0.0},
    ]
    ids, every = lora_listing(listed, config.adapter_of_file)
    assert ids == {"support": 0, "legal": 2}
    # The unknown file is still an id every request must set (to 0).
    assert every == (0, 1, 2)
    with pytest.raises(ValueError, match="lora-adapters"):
        lora_listing({"data": []}, config.adapter_of_file)
