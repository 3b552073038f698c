"""The router's pure checks as tables: request bodies (requests.check), what an engine's /v1/models
lists (fleet.listing), an engine pod as the router sees it (fleet.pod_member), the router's view of
a LoraServer (config.from_object) and the keys read from their mounted files (config.read_keys)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from kimi_operator.router import requests
from kimi_operator.router.config import AdapterState, KeyRef, RouterConfig, from_object, read_keys
from kimi_operator.router.fleet import Member, listing, pod_member
from kimi_operator.router.keys import Scope

SERVED = "kimi-k2.5"
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED, "messages": MESSAGES, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED, "prompt": "hi", **fields}


# -- request bodies that pass ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "is_chat"),
    [
        (chat(), True),
        (completion(), False),
        # SGLang's extensions pass on both endpoints.
        (chat(top_k=20, min_p=0.01, regex="a+", chat_template_kwargs={"thinking": True}), True),
        (completion(top_k=20, repetition_penalty=1.1, stop_token_ids=[1, 2], ignore_eos=False), False),
        # A null is the client's "not given", whatever the field's type.
        (chat(temperature=None, max_tokens=None, stop=None, stream=None), True),
        (chat(stream=True, stream_options={"include_usage": True}), True),
        (chat(stream_options={}), True),
        (chat(stop="\n"), True),
        (chat(stop=["a", "b"]), True),
        # Integers are numbers; numbers of any size are the engine's to bound.
        (chat(temperature=1, top_p=0.95, frequency_penalty=-1.5), True),
        (chat(temperature=10**400), True),
        (chat(max_tokens=10**40, seed=-1, n=1), True),
        (chat(tools=[], logit_bias={"1": 2}), True),
        # Content parts and a null content (an assistant message with tool calls) are left to the engine.
        (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]), True),
        (chat(messages=[{"role": "assistant", "content": None, "tool_calls": []}]), True),
        (completion(prompt=["a", "b"]), False),
        (completion(prompt=[1, 2, 3]), False),
        (completion(prompt=[[1, 2], [3]]), False),
        (completion(prompt=""), False),
        (completion(echo=True, best_of=2, suffix="x"), False),
        # The model is resolved after the checks: any string passes here.
        (chat(model="no-such-model"), True),
    ],
    ids=[
        "chat",
        "completion",
        "sglang-chat",
        "sglang-completion",
        "nulls",
        "stream-options",
        "empty-stream-options",
        "stop-string",
        "stop-list",
        "int-numbers",
        "huge-int-temperature",
        "huge-max-tokens",
        "tools-logit-bias",
        "content-parts",
        "null-content",
        "prompt-strings",
        "prompt-tokens",
        "prompt-token-lists",
        "empty-prompt-string",
        "completion-only-fields",
        "unknown-model",
    ],
)
def test_bodies_that_pass(body: dict[str, Any], is_chat: bool) -> None:
    assert requests.check(body, chat=is_chat) == body


# -- request bodies that are refused, and the param named --------------------------------------


@pytest.mark.parametrize(
    ("body", "is_chat", "param"),
    [
        # Not an object.
        ([], True, None),
        ([chat()], True, None),
        ("hello", True, None),
        (42, False, None),
        (None, False, None),
        (True, True, None),
        # The router chooses the adapter, never the client.
        (chat(lora_path="/adapters/other"), True, "lora_path"),
        (completion(lora_path=None), False, "lora_path"),
        # Arguments OpenAI would not recognise, and each endpoint's fields on the other.
        (chat(temperatur=1), True, "temperatur"),
        (chat(prompt="hi"), True, "prompt"),
        (completion(messages=MESSAGES), False, "messages"),
        (chat(echo=True), True, "echo"),
        (completion(tools=[]), False, "tools"),
        (chat(**{"": 1}), True, ""),
        # Missing what each endpoint needs.
        ({"messages": MESSAGES}, True, "model"),
        ({"prompt": "hi"}, False, "model"),
        ({"model": SERVED}, True, "messages"),
        ({"model": SERVED}, False, "prompt"),
        (completion(prompt=None), False, "prompt"),
        (chat(messages=None), True, "messages"),
        # The model's type: a null model is no model.
        (chat(model=None), True, "model"),
        (chat(model=42), True, "model"),
        (chat(model=["kimi-k2.5"]), True, "model"),
        (completion(model={"name": SERVED}), False, "model"),
        # Wrong types, field by field.
        (chat(stream="true"), True, "stream"),
        (chat(stream=1), True, "stream"),
        (chat(stream_options=[]), True, "stream_options"),
        (chat(stream_options={"include_usage": "yes"}), True, "stream_options.include_usage"),
        (chat(temperature="1"), True, "temperature"),
        (chat(temperature=True), True, "temperature"),
        (chat(temperature=math.nan), True, "temperature"),
        (chat(top_p=math.inf), True, "top_p"),
        (completion(min_p=-math.inf), False, "min_p"),
        (chat(frequency_penalty=[]), True, "frequency_penalty"),
        (chat(presence_penalty={}), True, "presence_penalty"),
        (completion(repetition_penalty="1.0"), False, "repetition_penalty"),
        (chat(max_tokens=1.5), True, "max_tokens"),
        (chat(max_tokens=100.0), True, "max_tokens"),
        (chat(max_tokens=True), True, "max_tokens"),
        (chat(max_tokens="100"), True, "max_tokens"),
        (chat(max_completion_tokens=[]), True, "max_completion_tokens"),
        (completion(min_tokens=False), False, "min_tokens"),
        (chat(n="2"), True, "n"),
        (chat(seed=1.0), True, "seed"),
        (chat(top_k=0.5), True, "top_k"),
        (chat(top_logprobs="5"), True, "top_logprobs"),
        (completion(best_of=[2]), False, "best_of"),
        (completion(echo="true"), False, "echo"),
        (chat(user=7), True, "user"),
        (chat(stop=1), True, "stop"),
        (chat(stop=["a", 1]), True, "stop"),
        (chat(stop={"a": 1}), True, "stop"),
        (chat(logit_bias=[1, 2]), True, "logit_bias"),
        (chat(tools={"type": "function"}), True, "tools"),
        (chat(chat_template_kwargs="thinking"), True, "chat_template_kwargs"),
        # Prompts.
        (completion(prompt=[]), False, "prompt"),
        (completion(prompt=["a", 1]), False, "prompt"),
        (completion(prompt=[[]]), False, "prompt"),
        (completion(prompt=[[1, "a"]]), False, "prompt"),
        (completion(prompt=[[1], 2]), False, "prompt"),
        (completion(prompt=[True]), False, "prompt"),
        (completion(prompt=[[True]]), False, "prompt"),
        (completion(prompt=1), False, "prompt"),
        (completion(prompt={"text": "hi"}), False, "prompt"),
        # Messages.
        (chat(messages=[]), True, "messages"),
        (chat(messages="hi"), True, "messages"),
        (chat(messages={"role": "user"}), True, "messages"),
        (chat(messages=["hi"]), True, "messages[0]"),
        (chat(messages=[*MESSAGES, None]), True, "messages[1]"),
        (chat(messages=[{"content": "hi"}]), True, "messages[0].role"),
        (chat(messages=[{"role": "", "content": "hi"}]), True, "messages[0].role"),
        (chat(messages=[{"role": 1, "content": "hi"}]), True, "messages[0].role"),
        (chat(messages=[{"role": None, "content": "hi"}]), True, "messages[0].role"),
        (chat(messages=[{"role": "user", "content": 1}]), True, "messages[0].content"),
        (chat(messages=[{"role": "user", "content": {"text": "hi"}}]), True, "messages[0].content"),
        (chat(messages=[*MESSAGES, {"role": "user", "content": True}]), True, "messages[1].content"),
    ],
)
def test_bodies_that_are_refused(body: Any, is_chat: bool, param: str | None) -> None:
    with pytest.raises(requests.Invalid) as refused:
        requests.check(body, chat=is_chat)
    assert refused.value.param == param
    assert refused.value.message


def test_a_refused_body_is_a_value_error() -> None:
    """The caller answers a ValueError (JSON that does not parse, or a body the checks refuse) with
    a 400; anything else would be a 500."""
    assert issubclass(requests.Invalid, ValueError)


def test_the_router_owned_field_is_refused_before_unknown_ones() -> None:
    with pytest.raises(requests.Invalid) as refused:
        requests.check(chat(lora_path="x", unknown=1), chat=True)
    assert refused.value.param == "lora_path"
    assert "chosen by 'model'" in refused.value.message


def test_every_typed_field_is_accepted_somewhere() -> None:
    """A type rule for a field neither endpoint accepts would be dead: each is in a field set."""
    every = requests.CHAT_FIELDS | requests.COMPLETION_FIELDS
    assert set(requests._TYPES) <= every
    assert not (requests.ROUTER_OWNED & every)


# -- what an engine's /v1/models lists ---------------------------------------------------------


def card(card_id: Any, parent: Any = SERVED) -> dict[str, Any]:
    return {"id": card_id, "object": "model", "parent": parent}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"object": "list", "data": []}, frozenset()),
        # The base model's card has no parent: it is not an adapter.
        ({"data": [{"id": SERVED, "object": "model"}]}, frozenset()),
        ({"data": [card(SERVED, None), card("support"), card("legal")]}, frozenset({"support", "legal"})),
        # Cards that are not cards, or lack an id, are skipped.
        ({"data": [card("support"), "x", None, 3, card(None), card("")]}, frozenset({"support"})),
        ({"data": [card("support", parent="")]}, frozenset()),
        ({"data": [card(7)]}, frozenset({"7"})),
        ({"data": [card("support"), card("support")]}, frozenset({"support"})),
    ],
    ids=["empty", "base-only", "adapters", "junk-cards", "empty-parent", "int-id", "twice"],
)
def test_listing(body: Any, expected: frozenset[str]) -> None:
    assert listing(body) == expected


@pytest.mark.parametrize(
    "body",
    [None, [], "data", {}, {"data": None}, {"data": {}}, {"data": "x"}, {"object": "list"}],
)
def test_listing_of_what_is_not_a_models_answer(body: Any) -> None:
    with pytest.raises(ValueError, match="not a /v1/models answer"):
        listing(body)


# -- an engine pod as the router sees it -------------------------------------------------------

KIND_LABEL = "kimi-operator.io/replica-kind"


def pod(
    *,
    name: str | None = "engine-0",
    ip: str | None = "10.0.0.5",
    ready: str | None = "True",
    ports: list[dict[str, Any]] | None = None,
    container: str = "engine",
    kind: str | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if name is not None:
        meta["name"] = name
    if kind is not None:
        meta["labels"] = {KIND_LABEL: kind}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {}
    if ip is not None:
        status["podIP"] = ip
    if ready is not None:
        status["conditions"] = [{"type": "Initialized", "status": "True"}, {"type": "Ready", "status": ready}]
    return {
        "metadata": meta,
        "spec": {
            "containers": [
                {"name": "agent", "ports": [{"name": "http", "containerPort": 8080}]},
                {"name": container, "ports": ports or []},
            ]
        },
        "status": status,
    }


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (pod(), Member("engine-0", "http://10.0.0.5:30000", True, False)),
        # The engine container's port named http; another container's is not the engine's.
        (
            pod(ports=[{"name": "metrics", "containerPort": 9}, {"name": "http", "containerPort": 31000}]),
            Member("engine-0", "http://10.0.0.5:31000", True, False),
        ),
        (
            pod(container="sidecar", ports=[{"name": "http", "containerPort": 31000}]),
            Member("engine-0", "http://10.0.0.5:30000", True, False),
        ),
        (pod(ports=[{"name": "http"}]), Member("engine-0", "http://10.0.0.5:30000", True, False)),
        (pod(ready="False"), Member("engine-0", "http://10.0.0.5:30000", False, False)),
        (pod(ready=None), Member("engine-0", "http://10.0.0.5:30000", False, False)),
        # A pod being deleted takes no new request, even while its Ready condition still says True.
        (pod(deleting=True), Member("engine-0", "http://10.0.0.5:30000", False, False)),
        (pod(kind="expert"), Member("engine-0", "http://10.0.0.5:30000", True, True)),
        (pod(kind="shared"), Member("engine-0", "http://10.0.0.5:30000", True, False)),
        (pod(ip="fd00::5"), Member("engine-0", "http://[fd00::5]:30000", True, False)),
        # Not an engine yet.
        (pod(ip=None), None),
        (pod(ip=""), None),
        (pod(name=None), None),
        ({}, None),
        ({"metadata": None, "spec": None, "status": None}, None),
    ],
    ids=[
        "plain",
        "named-port",
        "other-container",
        "port-without-number",
        "not-ready",
        "no-conditions",
        "deleting",
        "expert",
        "shared",
        "ipv6",
        "no-ip",
        "empty-ip",
        "no-name",
        "empty",
        "nulls",
    ],
)
def test_pod_member(obj: dict[str, Any], expected: Member | None) -> None:
    assert pod_member(obj, kind_label=KIND_LABEL) == expected


# -- the router's view of a LoraServer ----------------------------------------------------------


def loraserver(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "kimi-operator.io/v1alpha1", "kind": "LoraServer", "spec": spec}
    if status is not None:
        obj["status"] = status
    return obj


def test_from_object_defaults() -> None:
    config = from_object(loraserver({"model": {"name": "k"}}))
    assert config == RouterConfig(served=SERVED, adapters=frozenset(), defaults={}, keys=(), states={})
    assert config.max_body_bytes == 16 * 1024 * 1024


def test_from_object_reads_what_the_router_needs() -> None:
    spec = {
        "model": {"name": "k"},
        "servedModelName": "kimi",
        "adapters": [{"name": "support", "path": "/a"}, {"name": "legal", "path": "/b"}],
        "sampling": {"temperature": 1.0, "topP": 0.95, "minP": 0.01},
        "router": {
            "maxBodyBytes": 4096,
            "apiKeys": [
                {"id": "admin", "secretKeyRef": {"name": "keys", "key": "admin"}, "models": ["*"]},
                {"id": "team", "secretKeyRef": {"name": "team-keys", "key": "k"}, "models": ["kimi", "support"]},
            ],
        },
    }
    status = {
        "adapters": [
            {"name": "support", "kind": "Shared", "state": "Loaded"},
            {"name": "legal", "kind": "Shared", "state": "Failed", "message": "rank 128 > 64"},
            {"name": "old", "kind": "Unknown"},
            {"kind": "Shared", "state": "Loaded"},
        ]
    }
    config = from_object(loraserver(spec, status))
    assert config.served == "kimi"
    assert config.adapters == {"support", "legal"}
    # OpenAI's names, and SGLang's min_p; max_tokens is absent when the spec leaves it out.
    assert config.defaults == {"temperature": 1.0, "top_p": 0.95, "min_p": 0.01}
    assert config.max_body_bytes == 4096
    assert config.keys == (
        KeyRef("admin", "keys", "admin", frozenset({"*"})),
        KeyRef("team", "team-keys", "k", frozenset({"kimi", "support"})),
    )
    assert config.states == {
        "support": AdapterState("Loaded", None),
        "legal": AdapterState("Failed", "rank 128 > 64"),
        # A status entry without a state is Pending; one without a name is skipped.
        "old": AdapterState("Pending", None),
    }
    assert "rank 128 > 64" in config.why_unavailable("legal")
    assert "Failed" in config.why_unavailable("legal")
    assert "not loaded on any ready replica" in config.why_unavailable("new")
    assert "base model kimi" in config.why_unavailable(None)


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"model": {"name": "k"}, "servedModelName": "has space"},
        {"model": {"name": "k"}, "adapters": [{"name": "Bad:Name", "path": "/a"}]},
        {"model": {"name": "k"}, "router": {"maxBodyBytes": 10}},
        {"model": {"name": "k"}, "router": {"apiKeys": [{"id": "a", "secretKeyRef": {"name": "s", "key": "k"}}]}},
        {"model": {"name": "k"}, "router": {"apiKeys": [{"id": "a", "models": ["*"]}]}},
        {"model": {"name": "k"}, "unknownField": 1},
    ],
    ids=[
        "no-model",
        "bad-served",
        "bad-adapter",
        "tiny-body-limit",
        "key-without-models",
        "key-without-ref",
        "unknown",
    ],
)
def test_from_object_refuses_an_invalid_spec(spec: dict[str, Any]) -> None:
    # The in-cluster source keeps what it read last; the static one does not start.
    with pytest.raises(ValueError, match="validation error"):
        from_object(loraserver(spec))


def test_a_missing_spec_or_status_is_empty() -> None:
    with pytest.raises(ValueError, match="validation error"):
        from_object({"spec": None})
    assert from_object({"spec": {"model": {"name": "k"}}, "status": None}).states == {}


# -- keys from their mounted files -------------------------------------------------------------


def keyed_config(*refs: KeyRef) -> RouterConfig:
    return RouterConfig(served=SERVED, adapters=frozenset({"support", "legal"}), defaults={}, keys=refs)


ADMIN = KeyRef("admin", "keys", "admin", frozenset({"*"}))
TEAM = KeyRef("team", "team", "key", frozenset({SERVED, "support"}))
ADAPTER_ONLY = KeyRef("legal-only", "team", "legal", frozenset({"legal"}))


def write(root: Path, ref: KeyRef, value: str | bytes) -> None:
    path = ref.file(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(value)


def test_read_keys(tmp_path: Path) -> None:
    write(tmp_path, ADMIN, "sk-admin\n")
    write(tmp_path, TEAM, "  sk-team  ")
    write(tmp_path, ADAPTER_ONLY, "sk-legal")
    keys, problems = read_keys(keyed_config(ADMIN, TEAM, ADAPTER_ONLY), tmp_path)
    assert problems == []
    # The file's value, stripped of the newline a Secret often carries.
    assert keys == {
        "sk-admin": Scope("admin", base=True, adapters=frozenset(), all_adapters=True),
        "sk-team": Scope("team", base=True, adapters=frozenset({"support"})),
        "sk-legal": Scope("legal-only", base=False, adapters=frozenset({"legal"})),
    }


@pytest.mark.parametrize(
    ("value", "problem"),
    [(None, "cannot be read"), ("", "is empty"), ("  \n", "is empty")],
    ids=["missing", "empty", "blank"],
)
def test_a_key_that_cannot_be_had_is_not_accepted(tmp_path: Path, value: str | None, problem: str) -> None:
    write(tmp_path, ADMIN, "sk-admin")
    if value is not None:
        write(tmp_path, TEAM, value)
    keys, problems = read_keys(keyed_config(ADMIN, TEAM), tmp_path)
    assert set(keys) == {"sk-admin"}
    assert len(problems) == 1
    assert problems[0].startswith("key team: team/key ")
    assert problem in problems[0]


def test_a_key_file_that_is_a_directory_is_a_problem(tmp_path: Path) -> None:
    TEAM.file(tmp_path).mkdir(parents=True)
    keys, problems = read_keys(keyed_config(TEAM), tmp_path)
    assert keys == {}
    assert len(problems) == 1


def test_a_problem_never_shows_the_key(tmp_path: Path) -> None:
    write(tmp_path, ADMIN, "sk-admin-secret")
    _, problems = read_keys(keyed_config(ADMIN, TEAM), tmp_path)
    assert problems
    assert not any("sk-admin-secret" in p for p in problems)


def test_no_keys_configured_reads_nothing(tmp_path: Path) -> None:
    assert read_keys(keyed_config(), tmp_path) == ({}, [])


def test_a_key_file_that_is_not_text_is_a_problem(tmp_path: Path) -> None:
    write(tmp_path, ADMIN, "sk-admin")
    write(tmp_path, TEAM, b"\xff\xfe\x00binary")
    keys, problems = read_keys(keyed_config(ADMIN, TEAM), tmp_path)
    assert set(keys) == {"sk-admin"}
    assert len(problems) == 1
