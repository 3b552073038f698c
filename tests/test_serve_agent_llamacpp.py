"""The adapter agent beside a llama.cpp engine: which planned adapter each file of the server's
``/lora-adapters`` is, the report it makes of that answer (read by the operator's status code as an
SGLang agent's report is), and ``--once`` checking that each cache entry holds the GGUF file.

The server here is a stand-in that answers only what it is given; e2e/test_llamacpp_agent.py runs
the agent against a real llama-server."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kimi_operator.api.serving import (
    GGUF_ADAPTER_FILE,
    AdapterFiles,
    EngineApi,
    PlannedAdapter,
    ReplicaPlan,
    ServingPlan,
)
from kimi_operator.controller.loraserver_status import Replica, Wanted, adapter_status
from kimi_operator.workloads.serve import agent as agent_module
from kimi_operator.workloads.serve import cache
from kimi_operator.workloads.serve.agent import Agent, fill_once
from kimi_operator.workloads.serve.engine import Engine, EngineDown, LlamaServer
from kimi_operator.workloads.serve.llamacpp import NO_GGUF, adapters_of_files

CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["o_proj"]}).encode()
SERVED = "kimi-k2.5"
UID = "uid-1"


def weights(name: str) -> bytes:
    return b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + name.encode() * 16


SHA = {name: hashlib.sha256(weights(name)).hexdigest() for name in ("a", "b", "c", "nogguf", "old")}
C = Path("/adapter-cache")


@pytest.mark.parametrize(
    ("files", "digests", "expected"),
    [
        ([], {"a": SHA["a"]}, {}),
        ([f"{C}/{SHA['a']}/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"]}, {"a": f"{C}/{SHA['a']}"}),
        (
            [f"{C}/{SHA['b']}/{GGUF_ADAPTER_FILE}", f"{C}/{SHA['a']}/{GGUF_ADAPTER_FILE}"],
            {"a": SHA["a"], "b": SHA["b"]},
            {"a": f"{C}/{SHA['a']}", "b": f"{C}/{SHA['b']}"},
        ),
        # Planned but not among the server's files (its pod is being replaced): not listed.
        ([f"{C}/{SHA['a']}/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"], "b": SHA["b"]}, {"a": f"{C}/{SHA['a']}"}),
        # A file of an adapter no longer planned: names nothing.
        ([f"{C}/{SHA['old']}/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"]}, {}),
        # Named by its digest but outside the cache: never checked by the agent, so not counted.
        ([f"/elsewhere/{SHA['a']}/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"]}, {}),
        # The digest must be the directory holding the file, not any directory above it.
        ([f"{C}/{SHA['a']}/sub/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"]}, {}),
        # Two names for the same files: the server has both.
        (
            [f"{C}/{SHA['a']}/{GGUF_ADAPTER_FILE}"],
            {"a": SHA["a"], "a2": SHA["a"]},
            {"a": f"{C}/{SHA['a']}", "a2": f"{C}/{SHA['a']}"},
        ),
        ([""], {"a": SHA["a"]}, {}),
    ],
    ids=["none", "one", "two", "not-yet", "old-plan", "outside", "nested", "same-files", "empty-path"],
)
def test_adapters_of_files(files: list[str], digests: dict[str, str], expected: dict[str, str]) -> None:
    assert adapters_of_files(files, digests, C) == expected


class StandIn:
    """A llama-server that answers /health and /lora-adapters as it is told, and records every
    request it gets."""

    def __init__(self) -> None:
        self.health = 200
        self.lora: tuple[int, Any] = (200, [])
        self.seen: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.seen.append((self.command, self.path))
                if self.path == "/health":
                    code, body = outer.health, {"status": "ok"} if outer.health == 200 else {"error": {"code": 503}}
                elif self.path == "/lora-adapters":
                    code, body = outer.lora
                else:
                    code, body = 404, {"error": {"code": 404, "message": "File Not Found"}}
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn()
    try:
        yield server
    finally:
        server.close()


def source(models: Path, name: str, *, gguf: bool = True) -> Path:
    """An adapter directory as a FineTuneJob's export leaves it (adapter.gguf beside the weights)."""
    path = models / "adapters" / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_bytes(CONFIG)
    (path / "adapter_model.safetensors").write_bytes(weights(name))
    if gguf:
        (path / GGUF_ADAPTER_FILE).write_bytes(b"GGUF" + name.encode())
    return path


def planned(name: str, *, sha: bool = True, gguf_sha256: str | None = None) -> PlannedAdapter:
    files = AdapterFiles(kind="node", path=f"adapters/{name}")
    return PlannedAdapter(name=name, sha256=SHA[name] if sha else None, files=files, gguf_sha256=gguf_sha256)


def plan_of(adapters: list[PlannedAdapter], engine: EngineApi | None = "llamacpp") -> ServingPlan:
    replicas = [ReplicaPlan(replica="r0", adapters=adapters)]
    return ServingPlan(served_model_name=SERVED, generation=1, engine=engine, replicas=replicas)


def make_agent(tmp_path: Path, url: str, plan: ServingPlan | None, engine_api: EngineApi | None = None) -> Agent:
    return Agent(
        replica="r0",
        engine=Engine(url),
        plan=lambda: plan,
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
        pod_uid=UID,
        engine_api=engine_api,
    )


def gguf_of(name: str) -> str:
    """The sha256 of the adapter.gguf ``source`` writes for ``name``."""
    return hashlib.sha256(b"GGUF" + name.encode()).hexdigest()


def entry(tmp_path: Path, name: str) -> str:
    return f"{tmp_path / 'cache' / SHA[name] / GGUF_ADAPTER_FILE}"


def listing(*paths: str) -> list[dict[str, Any]]:
    return [{"id": i, "path": p, "scale": 0.0, "task_name": "", "prompt_prefix": ""} for i, p in enumerate(paths)]


# Each case: the plan's adapters (name, declared sha256), the server's /health code and
# /lora-adapters answer (paths with {cache} for the node cache), and the report's fields.
CASES: list[tuple[str, list[tuple[str, bool]], int, tuple[int, Any], dict[str, Any]]] = [
    (
        "every-planned-adapter-listed",
        [("a", True), ("b", True)],
        200,
        (200, ["a", "b"]),
        {"engineUp": True, "adapters": ["a", "b"], "loadedSha256": {"a": SHA["a"], "b": SHA["b"]}, "errors": []},
    ),
    (
        # Planned since the server started: not listed, and no error (a restart brings it).
        "planned-after-start",
        [("a", True), ("b", True), ("c", True)],
        200,
        (200, ["a", "b"]),
        {"engineUp": True, "adapters": ["a", "b"], "loadedSha256": {"a": SHA["a"], "b": SHA["b"]}, "errors": []},
    ),
    (
        # A file of an adapter removed from the plan names nothing.
        "removed-from-plan",
        [("a", True)],
        200,
        (200, ["a", "old"]),
        {"engineUp": True, "adapters": ["a"], "loadedSha256": {"a": SHA["a"]}, "errors": []},
    ),
    (
        # Planned without a digest: the one its files had names its file.
        "planned-without-digest",
        [("a", False)],
        200,
        (200, ["a"]),
        {"engineUp": True, "adapters": ["a"], "loadedSha256": {"a": SHA["a"]}, "errors": []},
    ),
    (
        "started-without-adapters",
        [("a", True)],
        200,
        (200, []),
        {"engineUp": True, "adapters": [], "loadedSha256": {}, "errors": []},
    ),
    (
        # Still loading the model: /health answers 503.
        "loading",
        [("a", True)],
        503,
        (503, {"error": {"code": 503, "message": "Loading model"}}),
        {"engineUp": False, "adapters": [], "loadedSha256": {}, "errors": []},
    ),
    (
        "not-a-llama-server",
        [("a", True)],
        200,
        (200, {"object": "list", "data": []}),
        {"engineUp": False, "adapters": [], "loadedSha256": {}, "errors": []},
    ),
    (
        # One its pod could not have started with: reported, as --once reports it.
        "planned-without-gguf",
        [("a", True), ("nogguf", True)],
        200,
        (200, ["a"]),
        {
            "engineUp": True,
            "adapters": ["a"],
            "loadedSha256": {"a": SHA["a"]},
            "errors": [{"name": "nogguf", "reason": "Unavailable", "message": NO_GGUF, "sha256": SHA["nogguf"]}],
        },
    ),
]


@pytest.mark.parametrize(("plan", "health", "answer", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_report_of_a_lora_adapters_answer(
    standin: StandIn,
    tmp_path: Path,
    plan: list[tuple[str, bool]],
    health: int,
    answer: tuple[int, Any],
    expected: dict[str, Any],
) -> None:
    for name in SHA:
        source(tmp_path / "models", name, gguf=name != "nogguf")
    agent = make_agent(tmp_path, standin.url, plan_of([planned(n, sha=s) for n, s in plan]))
    code, body = answer
    standin.health = health
    standin.lora = (code, listing(*(entry(tmp_path, n) for n in body)) if isinstance(body, list) else body)
    assert agent.step() == {"name": "r0", **expected, "podUid": UID}
    # Nothing is ever sent to the server: it is only asked.
    assert {method for method, _ in standin.seen} == {"GET"}
    assert {path for _, path in standin.seen} <= {"/health", "/lora-adapters"}


def test_the_operator_reads_the_report_as_an_sglang_agents(standin: StandIn, tmp_path: Path) -> None:
    for name in ("a", "b"):
        source(tmp_path / "models", name)
    plan = plan_of([planned("a"), planned("b")])
    agent = make_agent(tmp_path, standin.url, plan)
    assert fill_once(agent, plan, lambda status: None) == 0
    standin.lora = (200, listing(entry(tmp_path, "a")))
    report = agent.step()
    replicas = {"r0": Replica("r0", pod_ready=True, uid=UID)}
    state = {
        name: adapter_status(Wanted(name, "Shared", ("r0",), SHA[name]), replicas, {"r0": report})["state"]
        for name in ("a", "b")
    }
    assert state == {"a": "Loaded", "b": "Pending"}


def test_the_plan_chooses_the_engine_api(standin: StandIn, tmp_path: Path) -> None:
    """The same agent asks SGLang's /v1/models under an sglang plan, and never under a llamacpp one."""
    source(tmp_path / "models", "a")
    current: list[ServingPlan | None] = [plan_of([planned("a")], engine="sglang")]
    agent = Agent(
        replica="r0",
        engine=Engine(standin.url),
        plan=lambda: current[0],
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
    )
    agent.step()
    assert ("GET", "/v1/models") in standin.seen
    standin.seen.clear()
    current[0] = plan_of([planned("a")])
    standin.lora = (200, listing(str(tmp_path / "cache" / SHA["a"] / GGUF_ADAPTER_FILE)))
    assert agent.step()["adapters"] == ["a"]
    # Without a plan (the ConfigMap being recreated) it keeps to the last plan's engine, and reports
    # the server's adapters against the last plan read, not as if the server listed nothing.
    current[0] = None
    assert agent.step() == {
        "name": "r0",
        "engineUp": True,
        "adapters": ["a"],
        "loadedSha256": {"a": SHA["a"]},
        "errors": [],
    }
    assert {path for _, path in standin.seen} == {"/health", "/lora-adapters"}
    # A plan naming no engine is SGLang's (left out so older agents read it).
    standin.seen.clear()
    current[0] = plan_of([planned("a")], engine=None)
    agent.step()
    assert ("GET", "/v1/models") in standin.seen
    assert ("GET", "/lora-adapters") not in standin.seen


def test_a_server_that_does_not_answer_is_down() -> None:
    with pytest.raises(EngineDown):
        LlamaServer("http://127.0.0.1:9").adapter_files()


def test_once_fails_naming_the_adapter_without_its_gguf_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source(tmp_path / "models", "a")
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("a"), planned("nogguf")])
    agent = make_agent(tmp_path, "http://127.0.0.1:9", plan)
    written: list[dict[str, Any]] = []
    assert fill_once(agent, plan, written.append) == 1
    ((report,),) = [w["engines"] for w in written]
    assert report["engineUp"] is False
    assert report["errors"] == [
        {"name": "nogguf", "reason": "Unavailable", "message": NO_GGUF, "sha256": SHA["nogguf"]}
    ]
    assert "adapter.gguf" in NO_GGUF
    assert json.loads(capsys.readouterr().err)["event"] == "unavailable"
    # The good one is in the cache, GGUF file included.
    assert (tmp_path / "cache" / SHA["a"] / GGUF_ADAPTER_FILE).read_bytes() == b"GGUFa"


def test_an_adapter_planned_without_a_digest_is_reported_with_the_one_its_files_have(tmp_path: Path) -> None:
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("nogguf", sha=False)])
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "", plan), plan, written.append) == 1
    assert [e["sha256"] for e in written[0]["engines"][0]["errors"]] == [SHA["nogguf"]]


def test_once_for_sglang_needs_no_gguf_file(tmp_path: Path) -> None:
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("nogguf")], engine="sglang")
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "http://127.0.0.1:9", plan), plan, written.append) == 0
    assert written == []


def test_once_adds_the_gguf_file_to_an_entry_cached_without_it(tmp_path: Path) -> None:
    """An entry an SGLang server's agent cached from a source without the GGUF file: a later source
    of the same weights that carries it completes the entry, and the files there stay as they were."""
    models = tmp_path / "models"
    first = source(models, "a", gguf=False)
    sglang = plan_of([planned("a")], "sglang")
    assert fill_once(make_agent(tmp_path, "", sglang), sglang, print) == 0
    cached = tmp_path / "cache" / SHA["a"]
    before = (cached / "adapter_model.safetensors").stat().st_ino
    plan = plan_of([planned("a")])
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "", plan), plan, written.append) == 1
    (first / GGUF_ADAPTER_FILE).write_bytes(b"GGUFa")
    assert fill_once(make_agent(tmp_path, "", plan), plan, written.append) == 0
    assert (cached / GGUF_ADAPTER_FILE).read_bytes() == b"GGUFa"
    assert (cached / "adapter_model.safetensors").stat().st_ino == before
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [SHA["a"]]


def test_once_without_a_plan_has_nothing_to_fetch(tmp_path: Path) -> None:
    assert fill_once(make_agent(tmp_path, "", None), None, print) == 0


def counting_fetches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every copy the agent makes from an adapter's source, recorded by source path."""
    fetched: list[str] = []
    copy_from = cache.copy_from

    def counted(source_dir: Path, *, node_hint: str | None) -> Callable[[Path], None]:
        fetch = copy_from(source_dir, node_hint=node_hint)

        def run(target: Path) -> None:
            fetched.append(source_dir.name)
            fetch(target)

        return run

    monkeypatch.setattr(cache, "copy_from", counted)
    return fetched


def test_the_step_does_not_fetch_again_an_entry_without_its_gguf_file(
    standin: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry an SGLang agent cached without adapter.gguf, from a source that has none either: each
    step reports it, without copying (or downloading) and hashing the adapter again every 2 s; only
    --once completes an entry."""
    models = tmp_path / "models"
    first = source(models, "nogguf", gguf=False)
    sglang = plan_of([planned("nogguf")], "sglang")
    assert fill_once(make_agent(tmp_path, "", sglang), sglang, print) == 0
    fetched = counting_fetches(monkeypatch)
    plan = plan_of([planned("nogguf"), planned("a")])
    source(models, "a")
    agent = make_agent(tmp_path, standin.url, plan)
    standin.lora = (200, listing())
    error = {"name": "nogguf", "reason": "Unavailable", "message": NO_GGUF, "sha256": SHA["nogguf"]}
    for _ in range(3):
        assert agent.step()["errors"] == [error]
    # Only the adapter that was not cached at all was fetched, once.
    assert fetched == ["a"]
    # The source gains the file: the step still only reports; --once completes the entry.
    (first / GGUF_ADAPTER_FILE).write_bytes(b"GGUFnogguf")
    assert agent.step()["errors"] == [error]
    assert not (tmp_path / "cache" / SHA["nogguf"] / GGUF_ADAPTER_FILE).exists()
    assert fill_once(agent, plan, print) == 0
    assert fetched == ["a", "nogguf"]
    assert agent.step()["errors"] == []


def two_replicas(mine: list[PlannedAdapter], other: list[PlannedAdapter]) -> ServingPlan:
    replicas = [ReplicaPlan(replica="r0", adapters=mine), ReplicaPlan(replica="r1", adapters=other)]
    return ServingPlan(served_model_name=SERVED, generation=2, engine="llamacpp", replicas=replicas)


def test_once_with_digests_fetches_what_the_pods_command_line_names(tmp_path: Path) -> None:
    """The pod was made from a template listing a and c; the plan (the ConfigMap, already changed)
    places a and b on this replica, c on another: a and c are fetched, b is not."""
    for name in ("a", "b", "c"):
        source(tmp_path / "models", name)
    plan = two_replicas([planned("a"), planned("b")], [planned("c")])
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "", plan), plan, written.append, [SHA["a"], SHA["c"]]) == 0
    assert written == []
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([SHA["a"], SHA["c"]])
    assert (tmp_path / "cache" / SHA["c"] / GGUF_ADAPTER_FILE).read_bytes() == b"GGUFc"


def test_once_with_no_digests_fetches_nothing(tmp_path: Path) -> None:
    """An engine started with no adapter: nothing to make ready, whatever the plan (even one that
    could not be had)."""
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("nogguf")])
    assert fill_once(make_agent(tmp_path, "", plan), plan, print, []) == 0
    assert not (tmp_path / "cache").exists()


def test_once_with_digests_fails_naming_each_digest_it_could_not_make_ready(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A digest no planned adapter has, an adapter without adapter.gguf, and one whose source is
    gone: exit 1, each named with its digest in status and in the event line."""
    source(tmp_path / "models", "a")
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("a"), planned("nogguf"), planned("b")])  # b's source does not exist
    unknown = "f" * 64
    written: list[dict[str, Any]] = []
    digests = [SHA["a"], SHA["nogguf"], unknown, SHA["b"]]
    assert fill_once(make_agent(tmp_path, "", plan), plan, written.append, digests) == 1
    ((report,),) = [w["engines"] for w in written]
    errors = {e["sha256"]: e for e in report["errors"]}
    assert sorted(errors) == sorted([SHA["nogguf"], unknown, SHA["b"]])
    assert errors[SHA["nogguf"]]["message"] == NO_GGUF
    assert errors[SHA["b"]]["name"] == "b"
    assert "does not exist" in errors[SHA["b"]]["message"]
    assert errors[unknown]["reason"] == "Unavailable"
    assert len(errors[unknown]["name"]) <= 63
    assert f"sha256 {unknown}" in errors[unknown]["message"]
    assert "the serving plan has no adapter of these weights" in errors[unknown]["message"]
    event = json.loads(capsys.readouterr().err)
    assert event["event"] == "unavailable"
    assert sorted(sha for sha, _ in event["adapters"].values()) == sorted([SHA["nogguf"], unknown, SHA["b"]])


def test_once_without_a_plan_fails_for_the_digests_it_names(tmp_path: Path) -> None:
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "", None), None, written.append, [SHA["a"]]) == 1
    assert [e["sha256"] for e in written[0]["engines"][0]["errors"]] == [SHA["a"]]


def test_once_checks_the_gguf_digest_of_the_export(tmp_path: Path) -> None:
    source(tmp_path / "models", "a")
    good = plan_of([planned("a", gguf_sha256=gguf_of("a"))])
    assert fill_once(make_agent(tmp_path, "", good), good, print, [SHA["a"]]) == 0
    # The export reported another adapter.gguf than the entry holds.
    other = "0" * 64
    bad = plan_of([planned("a", gguf_sha256=other)])
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "", bad), bad, written.append, [SHA["a"]]) == 1
    ((error,),) = [w["engines"][0]["errors"] for w in written]
    entry = tmp_path / "cache" / SHA["a"]
    assert (error["name"], error["reason"], error["sha256"]) == ("a", "Unavailable", SHA["a"])
    message = error["message"]
    assert f"{entry / GGUF_ADAPTER_FILE} has sha256 {gguf_of('a')}, expected {other}" in message
    assert "the cache entry holds another adapter.gguf for these weights" in message
    assert f"remove {entry} on the node of r0" in message
    # Without --adapter-digests too.
    assert fill_once(make_agent(tmp_path, "", bad), bad, print) == 1


def test_an_entry_is_not_completed_with_a_gguf_file_of_another_digest(tmp_path: Path) -> None:
    """An entry cached without adapter.gguf; the source's adapter.gguf is not the one the export
    reported: it never goes into the entry (an engine would load it), and --once fails saying so."""
    models = tmp_path / "models"
    first = source(models, "a", gguf=False)
    sglang = plan_of([planned("a")], "sglang")
    assert fill_once(make_agent(tmp_path, "", sglang), sglang, print) == 0
    (first / GGUF_ADAPTER_FILE).write_bytes(b"GGUF, another")
    plan = plan_of([planned("a", gguf_sha256=gguf_of("a"))])
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "", plan), plan, written.append) == 1
    (error,) = written[0]["engines"][0]["errors"]
    found = hashlib.sha256(b"GGUF, another").hexdigest()
    assert f"holds a {GGUF_ADAPTER_FILE} with sha256 {found}, expected {gguf_of('a')}" in error["message"]
    assert not (tmp_path / "cache" / SHA["a"] / GGUF_ADAPTER_FILE).exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [SHA["a"]]


def test_the_step_hashes_a_gguf_file_once_and_reports_one_that_is_not_the_exports(
    standin: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source(tmp_path / "models", "a")
    source(tmp_path / "models", "b")
    plan = plan_of([planned("a", gguf_sha256=gguf_of("a")), planned("b", gguf_sha256=gguf_of("b"))])
    agent = make_agent(tmp_path, standin.url, plan)
    assert fill_once(agent, plan, print) == 0
    hashed: list[str] = []
    sha256_of = cache.sha256_of

    def counted(path: Path) -> str:
        hashed.append(path.name)
        return sha256_of(path)

    monkeypatch.setattr(cache, "sha256_of", counted)
    standin.lora = (200, listing(entry(tmp_path, "a"), entry(tmp_path, "b")))
    for _ in range(3):
        assert agent.step()["adapters"] == ["a", "b"]
    # Each adapter.gguf hashed at most once by this agent, not at each step.
    assert hashed.count(GGUF_ADAPTER_FILE) <= 2
    assert "adapter_model.safetensors" not in hashed
    # b's entry holds another adapter.gguf now (replaced behind the agent's back): the server does
    # not serve the export's file, so b is not reported as served, and the error says why.
    gguf = tmp_path / "cache" / SHA["b"] / GGUF_ADAPTER_FILE
    gguf.unlink()
    gguf.write_bytes(b"GGUF, replaced")
    report = agent.step()
    assert report["adapters"] == ["a"]
    ((error,),) = [report["errors"]]
    assert (error["name"], error["reason"], error["sha256"]) == ("b", "Unavailable", SHA["b"])
    assert f"expected {gguf_of('b')}" in error["message"]


def test_two_agents_completing_one_entry_never_replace_each_others_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other agent links its adapter.gguf in between this one's look and its own link: the file
    there stays, and this agent's copy was synced before any link."""
    entry_dir = tmp_path / "cache" / SHA["a"]
    staging = tmp_path / "cache" / ".partial-x"
    for directory in (entry_dir, staging):
        directory.mkdir(parents=True)
    (staging / GGUF_ADAPTER_FILE).write_bytes(b"GGUF, mine")
    theirs = entry_dir / GGUF_ADAPTER_FILE
    calls: list[str] = []
    exists, fsync, link = Path.exists, os.fsync, os.link

    def racing_exists(self: Path, **kwargs: Any) -> bool:
        if self == theirs and not exists(self):
            theirs.write_bytes(b"GGUF, theirs")  # the other agent, just after this one looked
            return False
        return exists(self, **kwargs)

    def recording_fsync(fd: int) -> None:
        calls.append("fsync")
        fsync(fd)

    def recording_link(src: Any, dst: Any, **kwargs: Any) -> None:
        calls.append("link")
        link(src, dst, **kwargs)

    monkeypatch.setattr(Path, "exists", racing_exists)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "link", recording_link)
    cache._add_missing(staging, entry_dir, (GGUF_ADAPTER_FILE,))
    assert theirs.read_bytes() == b"GGUF, theirs"
    assert calls == ["fsync", "link"]


def test_the_pods_engine_api_wins_over_the_plans(standin: StandIn, tmp_path: Path) -> None:
    """--engine-api=llamacpp: during a switch the plan already says SGLang (engine left out), and the
    old llama.cpp pod's agent keeps asking its own engine, and its init container keeps fetching
    adapter.gguf."""
    source(tmp_path / "models", "a")
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("a"), planned("nogguf")], engine=None)
    assert plan.engine is None
    agent = make_agent(tmp_path, standin.url, plan, engine_api="llamacpp")
    written: list[dict[str, Any]] = []
    assert fill_once(agent, plan, written.append) == 1
    assert [e["name"] for e in written[0]["engines"][0]["errors"]] == ["nogguf"]
    standin.lora = (200, listing(entry(tmp_path, "a")))
    assert agent.step()["adapters"] == ["a"]
    assert {path for _, path in standin.seen} == {"/health", "/lora-adapters"}
    # And the other way round: an SGLang pod's agent under a llama.cpp plan.
    standin.seen.clear()
    sglang_agent = make_agent(tmp_path, standin.url, plan_of([planned("a")]), engine_api="sglang")
    sglang_agent.step()
    assert {path for _, path in standin.seen} == {"/v1/models"}


def test_the_command_line_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--engine-api`` and ``--adapter-digests`` as the operator renders them on the init container."""
    from kimi_operator.workloads import report  # noqa: PLC0415

    source(tmp_path / "models", "a")
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("a"), planned("nogguf")], engine=None)
    written: list[dict[str, Any]] = []

    class Own:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def apply(self, status: dict[str, Any]) -> None:
            written.append(status)

    monkeypatch.setattr(agent_module, "_kube_sources", lambda namespace, name: (None, lambda: plan))
    monkeypatch.setattr(report, "OwnStatus", Own)
    base = [
        "--report=ns/ls",
        "--plan=ls-plan",
        "--replica=r0",
        "--engine=http://127.0.0.1:9",
        f"--models-dir={tmp_path / 'models'}",
        f"--cache-dir={tmp_path / 'cache'}",
        "--once",
        "--engine-api=llamacpp",
    ]
    assert agent_module.main([*base, f"--adapter-digests={SHA['a']}"]) == 0
    assert agent_module.main([*base, "--adapter-digests="]) == 0
    assert written == []
    # Without the list: the plan's adapters for this replica, as llama.cpp loads them (the flag,
    # not the plan, says llama.cpp).
    assert agent_module.main(base) == 1
    assert [e["name"] for e in written[0]["engines"][0]["errors"]] == ["nogguf"]
    assert agent_module.main([*base, f"--adapter-digests={SHA['a']},{SHA['nogguf']}"]) == 1
    assert agent_module.parse_digests("") == []
    assert agent_module.parse_digests(f"{SHA['a']},{SHA['b']}") == [SHA["a"], SHA["b"]]


def test_the_step_does_not_fetch_again_a_source_holding_another_gguf_file(
    standin: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planned after the server's start, its source's adapter.gguf is not the export's: nothing goes
    into the cache, the step says why, and it does not copy and hash the source again every step."""
    source(tmp_path / "models", "a")
    plan = plan_of([planned("a", gguf_sha256="0" * 64)])
    agent = make_agent(tmp_path, standin.url, plan)
    fetched = counting_fetches(monkeypatch)
    for _ in range(3):
        (error,) = agent.step()["errors"]
        assert f"holds a {GGUF_ADAPTER_FILE} with sha256 {gguf_of('a')}, expected {'0' * 64}" in error["message"]
    assert fetched == ["a"]
    assert not (tmp_path / "cache" / SHA["a"]).exists()
    # --once fetches again (the source may have been put right).
    assert fill_once(agent, plan, print) == 1
    assert fetched == ["a", "a"]
