"""The router against the real apiserver, in front of engine stand-ins, called with the official
``openai`` client.

KWOK runs the pods' phases; the local pod runner runs what each pod runs, as that pod: the engines
and their agents (as in e2e/test_loraserver.py), and the router with its container's own arguments,
bound to its pod's 127.x IP, with its ServiceAccount's token (its Role is the one the operator
rendered) and its key Secret's files, written again when the Secret changes.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import openai
import pytest

from e2e.conftest import OperatorProcess, PrometheusProcess
from e2e.helpers import http, wait_for
from e2e.manifests import GROUP, VERSION
from e2e.test_kimimodel import condition
from e2e.test_loraserver import (
    NODES,
    RESTART_AFTER,
    EnginePod,
    Node,
    Serving,
    adapters_by_name,
    container_process,
    custom,
    get,
    lsrv,
    model_on,
    nodes,  # noqa: F401 (a fixture)
    quick_images,
    restarted,
    serving,  # noqa: F401 (a fixture)
    shared_and_expert_adapters,
    started_runner,
    tiny,  # noqa: F401 (a fixture)
)
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.podprocess import Process
from kimi_operator.devcluster.runner import PodRunner

pytestmark = pytest.mark.e2e

SERVED = "kimi-k2.5"
ADMIN, TEAM, TEAM_ROTATED = "sk-admin-7f3a", "sk-team-19c2", "sk-team-rotated-55d0"
QUESTION = [{"role": "user", "content": "hello world"}]
# Every generated token takes at least this long: a long stream is surely in its middle when its
# engine dies.
TOKEN_DELAY = 0.02


@pytest.fixture
def runner(cluster: Cluster, api: kubernetes.client.ApiClient, train_python: str) -> Iterator[PodRunner]:
    images = quick_images(train_python, standin=(f"--standin-token-delay={TOKEN_DELAY}",))
    with started_runner(cluster, api, images) as handle:
        yield handle


class RouterPod:
    """The router pod as the runner runs it."""

    def __init__(self, pod: Any, runner: PodRunner) -> None:
        self.name, self.ip, self.uid, self.runner = pod.metadata.name, pod.status.pod_ip, pod.metadata.uid, runner
        (container,) = pod.spec.containers
        self.port = next(p.container_port for p in container.ports if p.name == "http")
        self.metrics_port = next(p.container_port for p in container.ports if p.name == "metrics")

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def process(self) -> Process:
        return container_process(self.runner, self.uid, "router")

    def ready(self) -> bool:
        return http(f"{self.url}/ready")[0] == 200

    def restart(self) -> None:
        """The router's process stopped (SIGTERM) and started again by the runner, in the same pod."""
        stopped = time.monotonic()
        self.process().signal(signal.SIGTERM)
        wait_for(
            lambda: self.process().started_at > stopped and self.ready(), RESTART_AFTER + 60, "the router restarted"
        )

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)


def start_router(api: kubernetes.client.ApiClient, namespace: str, name: str, runner: PodRunner) -> RouterPod:
    """The LoraServer's router pod, once the runner has it answering /ready."""
    core = kubernetes.client.CoreV1Api(api)
    selector = f"kimi-operator.io/loraserver={name},app.kubernetes.io/component=router"
    (pod,) = wait_for(
        lambda: (
            (found := [p for p in core.list_namespaced_pod(namespace, label_selector=selector).items])
            and all(p.status.phase == "Running" and p.status.pod_ip for p in found)
            and found
        ),
        60,
        "the router pod running",
    )
    router = RouterPod(pod, runner)
    wait_for(router.ready, 60, "the router ready")
    return router


def engine_requests(url: str) -> float:
    """The engine's own count of generation requests it ran (sglang:num_requests_total)."""
    code, body = http(f"{url}/metrics")
    assert code == 200, body
    found = re.search(r"^sglang:num_requests_total(?:\{[^}]*\})? ([0-9.e+]+)$", body, re.MULTILINE)
    assert found, body[:500]
    return float(found[1])


def answer(client: openai.OpenAI, model: str, *, stream: bool = False) -> str:
    if not stream:
        reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        return reply.choices[0].message.content or ""
    chunks = client.chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    parts = []
    for chunk in chunks:
        # The client did not ask for usage: the router asked the engine for it and kept it back.
        assert chunk.usage is None
        parts.extend(c.delta.content or "" for c in chunk.choices)
    return "".join(parts)


@pytest.mark.timeout(900)
def test_the_openai_client_reaches_each_adapter_where_an_engine_holds_it(
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    prometheus: PrometheusProcess,
    tiny: Path,  # noqa: F811
    nodes: dict[str, Node],  # noqa: F811
    serving: Serving,  # noqa: F811
    runner: PodRunner,
) -> None:
    model_on(api, namespace, NODES)
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "api-keys"}, "stringData": {"admin": ADMIN, "team": TEAM}}
    )
    adapters = shared_and_expert_adapters(tiny, nodes)
    keys = {
        "apiKeys": [
            {"id": "admin", "secretKeyRef": {"name": "api-keys", "key": "admin"}, "models": ["*"]},
            {"id": "team", "secretKeyRef": {"name": "api-keys", "key": "team"}, "models": [SERVED, "a0"]},
        ]
    }
    server = lsrv(
        "serve",
        replicas=2,
        adapters=adapters,
        # Two adapters per shared replica, each adapter on one: where a request goes matters.
        engine={
            "maxLoraRank": 16,
            "loraTargetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "maxLorasPerBatch": 2,
            "maxLoadedLoras": 2,
        },
        placement={"replicasPerAdapter": 1},
        router=keys,
    )
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", server)
    serving.start(3)

    def all_loaded() -> dict[str, Any] | None:
        obj = get(api, namespace, "loraservers", "serve")
        found = adapters_by_name(obj)
        ready = condition(obj, "Ready")
        ok = len(found) == 5 and all(a["state"] == "Loaded" for a in found.values())
        return obj if ok and ready and ready["status"] == "True" else None

    obj = wait_for(all_loaded, 180, "every adapter Loaded and the LoraServer Ready")
    # The status names the router's Service once a router pod is ready.
    assert obj["status"]["endpoint"] == f"http://serve-router.{namespace}.svc:8000/v1"
    holders = {name: a["replicas"] for name, a in adapters_by_name(obj).items()}
    assert all(len(r) == 1 for r in holders.values()), holders
    (dedicated,) = holders["legal"]
    shared = sorted(n for n in serving.pods if n != dedicated)

    router = start_router(api, namespace, "serve", runner)
    prometheus.add_target("serve-router", f"{router.ip}:{router.metrics_port}", {"namespace": namespace})
    admin = router.client(ADMIN)

    # /v1/models: the base and every adapter an engine lists, as ids clients can send.
    names = {"a0", "a1", "a2", "a3", "legal"}
    wait_for(lambda: {m.id for m in admin.models.list()} == {SERVED, *names}, 30, "every adapter listed")

    # Each adapter answers as it does on the engine that holds it, whatever name form the
    # client uses, streaming or not; and differently from the base model.
    expected = {a: serving.pods[holders[a][0]].chat(f"{SERVED}:{a}") for a in names}
    base = serving.pods[shared[0]].chat(SERVED)
    # (The tiny expert adapter changes nothing a dense model computes: only the shared ones differ.)
    assert len({*(expected[a] for a in ("a0", "a1", "a2", "a3")), base}) == 5
    for a in sorted(names):
        for model in (a, f"{SERVED}:{a}"):
            assert answer(admin, model) == expected[a], model
            assert answer(admin, model, stream=True) == expected[a], model
    assert answer(admin, SERVED) == base
    # The bare name sent straight to the engine runs the base model (SGLang's trap): the router
    # is what makes the bare name work.
    assert serving.pods[holders["a0"][0]].chat("a0") == base

    # Hits per replica, from the engines' own counters: an adapter reaches only its holder, and
    # base requests never reach the expert replica.
    before = {n: engine_requests(p.url) for n, p in serving.pods.items()}
    sent = {"a0": 1, "a1": 2, "a2": 3, "a3": 4, "legal": 5}
    for a, count in sent.items():
        for _ in range(count):
            admin.chat.completions.create(model=a, messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
    after = {n: engine_requests(p.url) for n, p in serving.pods.items()}
    for n in serving.pods:
        assert after[n] - before[n] == sum(c for a, c in sent.items() if n in holders[a]), n
    for _ in range(6):
        admin.completions.create(model=SERVED, prompt="hello", max_tokens=2)
    final = {n: engine_requests(p.url) for n, p in serving.pods.items()}
    assert final[dedicated] == after[dedicated]
    assert sum(final[n] - after[n] for n in shared) == 6

    # Keys: none or a wrong one is 401, a model outside the key's list 403; the rotated Secret
    # takes effect without a restart of the router.
    # (The openai client will not send a request without a key: plain HTTP does.)
    code, body = http(f"{router.url}/v1/chat/completions", chat_body("a0"))
    assert code == 401, body
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        router.client("sk-wrong").chat.completions.create(model="a0", messages=QUESTION)  # type: ignore[arg-type]
    team = router.client(TEAM)
    with pytest.raises(openai.PermissionDeniedError):
        team.chat.completions.create(model="a1", messages=QUESTION)  # type: ignore[arg-type]
    assert answer(team, "a0") == expected["a0"]
    assert {m.id for m in team.models.list()} == {SERVED, "a0"}
    # The runner writes the Secret's new data into the router's mounted files, as a kubelet does.
    core.patch_namespaced_secret("api-keys", namespace, {"stringData": {"team": TEAM_ROTATED}})

    def rotated() -> bool:
        try:
            router.client(TEAM_ROTATED).models.list()
        except openai.AuthenticationError:
            return False
        return True

    wait_for(rotated, 60, "the rotated key accepted")
    with pytest.raises(openai.AuthenticationError):
        team.models.list()

    # An unknown model is OpenAI's 404; an adapter removed from the spec is refused by the router
    # although the engine would still run it (SGLang reloads any name it ever loaded).
    with pytest.raises(openai.NotFoundError) as missing:
        admin.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    kept = [a for a in adapters if a["name"] != "a3"]
    custom(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "loraservers", "serve", {"spec": {"adapters": kept}}
    )

    def refused() -> bool:
        try:
            admin.chat.completions.create(model="a3", messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
        except openai.NotFoundError:
            return True
        except openai.InternalServerError as exc:
            # 503 meanwhile: the agent may unload it before the router has read the new spec.
            if exc.status_code != 503:
                raise
        return False

    wait_for(refused, 30, "a3 refused by the router once it left the spec")
    assert http(f"{serving.pods[holders['a3'][0]].url}/v1/chat/completions", chat_body(f"{SERVED}:a3"))[0] == 200

    # Per-adapter metrics in the real Prometheus.
    def scraped() -> set[str]:
        query = f'sum by (model) (kimi_router_requests_total{{code="200",namespace="{namespace}"}})'
        result = prometheus.vector(query)
        return {r["metric"]["model"] for r in result}

    wait_for(lambda: scraped() >= {SERVED, *names}, 30, "requests per adapter in Prometheus")
    for query in (
        f'sum by (model) (kimi_router_completion_tokens_total{{namespace="{namespace}"}})',
        f'sum by (model) (kimi_router_time_to_first_token_seconds_count{{namespace="{namespace}"}})',
        f'sum by (key) (kimi_router_requests_total{{namespace="{namespace}"}})',
    ):
        found = {r["metric"].get("model") or r["metric"].get("key") for r in prometheus.vector(query)}
        assert found, query

    # The refused keys' series came last: a scrape may not have seen them yet.
    def keys() -> set[str]:
        return {r["metric"]["key"] for r in prometheus.vector(query)}

    wait_for(lambda: keys() >= {"admin", "team", "invalid"}, 30, "requests per key id in Prometheus")
    keys_seen = keys()
    assert not any(k in keys_seen for k in (ADMIN, TEAM, TEAM_ROTATED))

    # Nothing was restarted so far (the rotated key reached the router it ran on).
    assert restarted(runner) == {}
    # A router restart rebuilds everything from the engines and the API.
    router.restart()
    assert answer(admin, "a1") == expected["a1"]

    # An engine dies under load: requests that start after it died all succeed elsewhere; then
    # one dies in the middle of a stream.
    victim = serving.pods[next(n for n in shared if any(holders[a] == [n] for a in ("a0", "a1", "a2")))]
    killed = requests_survive_an_engine_killed_under_load(admin, victim)
    only_victim = next(a for a in ("a0", "a1", "a2") if holders[a] == [victim.name])
    # The runner starts the engine again after its back-off, and the agent loads the adapter.
    wait_for(lambda: victim.restarted_since(killed), RESTART_AFTER + 30, f"{victim.name} restarted")
    wait_for(victim.answering, 180, f"{victim.name} answering")
    wait_for(lambda: adapter_served(admin, only_victim), 60, f"{only_victim} back on {victim.name}")
    assert restarted(runner) == {f"{namespace}/{router.name}/router": 1, f"{namespace}/{victim.name}/engine": 1}
    a_stream_cut_by_its_engine_ends_in_an_error(admin, victim, only_victim)


def adapter_served(admin: openai.OpenAI, adapter: str) -> bool:
    """The router sends requests for ``adapter`` to an engine again (one short answer)."""
    try:
        admin.chat.completions.create(model=adapter, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]
    except openai.APIStatusError:
        return False
    return True


def requests_survive_an_engine_killed_under_load(admin: openai.OpenAI, victim: EnginePod) -> float:
    """When the engine was killed."""
    results: list[tuple[float, float, str | None]] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            began = time.monotonic()
            try:
                admin.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=4)  # type: ignore[arg-type]
                error = None
            except openai.APIError as exc:
                error = f"{type(exc).__name__}: {exc}"
            results.append((began, time.monotonic(), error))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(results) >= 6, 60, "load running")
        killed = victim.crash()
        wait_for(lambda: sum(1 for b, _, _ in results if b > killed) >= 20, 60, "requests after the kill")
    finally:
        done.set()
        for w in workers:
            w.join()
    after_kill = [r for r in results if r[0] > killed]
    assert [e for _, _, e in after_kill if e] == []
    return killed


def a_stream_cut_by_its_engine_ends_in_an_error(admin: openai.OpenAI, victim: EnginePod, adapter: str) -> None:
    stream = admin.chat.completions.create(
        model=adapter,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=200,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    outcome: list[str] = []

    def consume() -> None:
        try:
            for _ in stream:
                if not outcome:
                    outcome.append("first")
        except openai.APIError as exc:
            outcome.append(f"error: {exc}")
        else:
            outcome.append("ended without an error")

    reader = threading.Thread(target=consume)
    reader.start()
    wait_for(lambda: outcome, 30, "the first event of the stream")
    victim.crash()
    reader.join(timeout=30)
    assert not reader.is_alive(), "the stream hangs after its engine died"
    assert outcome[-1].startswith("error:"), outcome
    assert "stopped in the middle" in outcome[-1], outcome


def chat_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": QUESTION, "max_tokens": 2}
