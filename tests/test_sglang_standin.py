"""The SGLang stand-in of the e2e tests answers as SGLang's HTTP server does (REFERENCE.md,
gpu/SGLANG.md, e2e/gpu/serve/RESULTS.md: what a real sglang 0.5.16 answered) and really generates:
a tiny Llama and PEFT adapters are built here in the training environment, the stand-in serves them
on a free port of 127.0.0.1, and what it generates is compared with plain transformers+peft. The
client is the standard library's: a router speaks plain HTTP too."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ENGINES = Path(__file__).parents[1] / "e2e" / "engines"
STANDIN, TINY = ENGINES / "sglang_standin.py", ENGINES / "tiny_lora.py"
SERVED = "tiny-kimi"
PROMPT = "the capital of france is"
TOKENS = 12
# Generation is greedy everywhere, so answers are comparable token for token.
GREEDY = {"temperature": 0, "max_tokens": TOKENS}
KT_DYNAMIC_REFUSED = "Dynamic LoRA loading is disabled because KT expert LoRA is statically paired"
NEVER_LOADED = "Got LoRA adapter that has never been loaded: nope\nAll loaded adapters: dict_keys("
STARTUP_S = 120.0
# What the operator sets in the engine pods (a real SGLang has no /ready): /health does not generate.
CHEAP_HEALTH = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false"}

Refs = dict[str, dict[str, Any]]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    base = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return {**os.environ, **base, **(extra or {})}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Answer:
    status: int
    raw: bytes
    content_type: str | None

    def json(self) -> Any:
        return json.loads(self.raw)

    def events(self) -> list[str]:
        """The data of each server-sent event, in order."""
        return [line.removeprefix("data: ") for line in self.raw.decode().splitlines() if line.startswith("data: ")]


@dataclasses.dataclass
class Engine:
    """A running stand-in."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    seen: list[int] = dataclasses.field(default_factory=list)

    def call(self, method: str, path: str, body: Any = None) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return Answer(response.status, response.read(), response.getheader("Content-Type"))
        finally:
            conn.close()

    def get(self, path: str) -> Answer:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Answer:
        return self.call("POST", path, body)

    def complete(self, model: str, **extra: Any) -> Answer:
        return self.post("/v1/completions", {"model": model, "prompt": PROMPT, **GREEDY, **extra})

    def text(self, model: str, **extra: Any) -> str:
        answer = self.complete(model, **extra)
        assert answer.status == 200, answer.raw
        return str(answer.json()["choices"][0]["text"])

    def cards(self) -> dict[str, dict[str, Any]]:
        return {card["id"]: card for card in self.get("/v1/models").json()["data"]}

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_healthy(self) -> None:
        """Polls /health until it is 200, recording what it answered once the port was open."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the stand-in exited {self.proc.returncode}:\n{self.output()}"
            with contextlib.suppress(OSError):
                self.seen.append(self.get("/health").status)
                if self.seen[-1] == 200:
                    return
            time.sleep(0.05)
        pytest.fail(f"the stand-in was not healthy within {STARTUP_S} s:\n{self.output()}")


def launch(python: str, logs: Path, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> Engine:
    port, log = free_port(), logs / f"{name}.log"
    command = [python, str(STANDIN), "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env(extra_env))
    return Engine(proc, port, log)


def stop(engine: Engine) -> None:
    engine.proc.terminate()
    try:
        engine.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        engine.proc.kill()
        engine.proc.wait()


@pytest.fixture(scope="session")
def tiny(train_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model, its adapters, and transformers+peft's greedy continuations of PROMPT (references.json)."""
    out = tmp_path_factory.mktemp("tiny-lora")
    command = [train_python, str(TINY), str(out), "--adapters", "4", "--reference-prompt", PROMPT]
    proc = subprocess.run(
        [*command, "--max-tokens", str(TOKENS)], capture_output=True, text=True, env=env(), check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def adapter(tiny: Path, name: str) -> str:
    return str(tiny / "adapters" / name)


@pytest.fixture(scope="session")
def completions(tiny: Path) -> Refs:
    """transformers+peft's continuations of PROMPT, by ``base`` or adapter directory name."""
    found: Refs = json.loads((tiny / "references.json").read_text())["completion"]
    return found


@pytest.fixture(scope="session")
def chats(tiny: Path) -> Refs:
    """The same, of PROMPT as a user turn under the chat template."""
    found: Refs = json.loads((tiny / "references.json").read_text())["chat"]
    return found


def shared_args(tiny: Path) -> list[str]:
    """A shared replica as the operator renders one: the pool declared at start (here with one adapter
    in it), and sglang-kt's flags, which the stand-in accepts without using them. Its warm-up is
    stretched so that /health is seen answering 503."""
    return [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED, "--enable-lora"),
        *("--lora-paths", f"a0={adapter(tiny, 'a0')}", "--max-lora-rank", "16"),
        *("--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "--lora-backend", "csgmv"),
        *("--max-loras-per-batch", "4", "--max-loaded-loras", "8", "--enable-metrics", "--trust-remote-code"),
        *("--kt-method", "AMXINT4", "--kt-cpuinfer", "2", "--tool-call-parser", "kimi_k2", "--tp", "1"),
        *("--standin-startup-delay", "1"),
    ]


def small_args(tiny: Path) -> list[str]:
    """Two slots, two adapters in memory at most (and the benchmarks' per-token delay)."""
    return [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED),
        *("--lora-paths", json.dumps({"lora_name": "a0", "lora_path": adapter(tiny, "a0"), "pinned": False})),
        *("--max-loras-per-batch", "2", "--max-loaded-loras", "2", "--standin-token-delay", "0.001"),
    ]


def expert_args(tiny: Path) -> list[str]:
    """A dedicated replica as the operator renders one for an expert adapter."""
    return [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED, "--enable-lora"),
        *("--lora-paths", f"kt={adapter(tiny, 'expert')}", "--max-lora-rank", "16", "--max-loras-per-batch", "2"),
        *("--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj"),
        *("--disable-cuda-graph", "--pp-size", "1", "--kt-num-gpu-experts", "0", "--max-running-requests", "4"),
    ]


@pytest.fixture(scope="session")
def engines(train_python: str, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    """The three stand-ins of these tests, started side by side (each spends seconds importing torch)."""
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "shared": launch(train_python, logs, "shared", shared_args(tiny), CHEAP_HEALTH),
        "small": launch(train_python, logs, "small", small_args(tiny)),
        "expert": launch(train_python, logs, "expert", expert_args(tiny)),
    }
    try:
        for engine in started.values():
            engine.wait_healthy()
        yield started
    finally:
        for engine in started.values():
            stop(engine)


@pytest.fixture
def standin(engines: dict[str, Engine]) -> Engine:
    return engines["shared"]


def test_health_is_503_during_the_warm_up_then_200(standin: Engine) -> None:
    assert standin.seen[0] == 503
    assert standin.seen[-1] == 200
    assert standin.get("/health").raw == b""
    began = time.monotonic()
    health = standin.get("/health_generate")
    # It generates, and looks once a second whether a token came.
    assert (health.status, health.raw, health.content_type) == (200, b"", None)
    assert time.monotonic() - began >= 1.0
    ready = standin.get("/ready")
    assert (ready.status, ready.json()) == (404, {"detail": "Not Found"})


def test_models_lists_the_base_then_each_adapter(standin: Engine, tiny: Path) -> None:
    listing = standin.get("/v1/models").json()
    assert listing["object"] == "list"
    base, cards = listing["data"][0], {card["id"]: card for card in listing["data"][1:]}
    expected = {"id": SERVED, "object": "model", "owned_by": "sglang", "root": SERVED, "parent": None}
    assert base.items() >= (expected | {"max_model_len": 2048}).items()
    assert cards["a0"].items() >= {"root": adapter(tiny, "a0"), "parent": SERVED, "max_model_len": None}.items()
    assert standin.get(f"/v1/models/{SERVED}").json()["id"] == SERVED
    missing = standin.get("/v1/models/a0")
    assert missing.status == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_load_adds_a_card_and_a_second_load_of_the_name_is_refused(standin: Engine, tiny: Path) -> None:
    loaded = standin.post("/load_lora_adapter", {"lora_name": "t-load", "lora_path": adapter(tiny, "a2")})
    assert loaded.status == 200, loaded.raw
    body = loaded.json()
    assert body == body | {"success": True, "error_message": "", "rid": None, "http_worker_ipc": None}
    assert body["loaded_adapters"]["t-load"] == adapter(tiny, "a2")
    assert standin.cards()["t-load"]["parent"] == SERVED
    again = standin.post("/load_lora_adapter", {"lora_name": "t-load", "lora_path": adapter(tiny, "a3")})
    assert again.status == 400
    assert again.json()["success"] is False
    assert again.json()["error_message"] == "Failed to load LoRA adapter t-load because it is already loaded"
    assert standin.cards()["t-load"]["root"] == adapter(tiny, "a2")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("wrong-rank", "LoRA adapter bad-wrong-rank with rank 32 is incompatible with the current LoRA memory pool"),
        ("corrupt", "Error while deserializing header: incomplete metadata, file not fully covered"),
        ("dora", "Failed to load bad-dora because LoRA serving currently doesn't support DoRA adapters"),
        ("no-config", "No such file or directory"),
        ("missing-dir", "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
        # Its expert modules are no part of the pool (the stand-in refuses expert LoRA at run time anyway).
        ("expert", "LoRA adapter bad-expert with rank 8 is incompatible"),
    ],
    ids=["wrong-rank", "corrupt", "dora", "no-config", "missing-dir", "expert"],
)
def test_adapters_sglang_cannot_load_are_refused(
    standin: Engine, tiny: Path, tmp_path: Path, name: str, message: str
) -> None:
    path = adapter(tiny, name)
    if name == "no-config":
        path = str(shutil.copytree(adapter(tiny, "a0"), tmp_path / "no-config"))
        (tmp_path / "no-config" / "adapter_config.json").unlink()
    refused = standin.post("/load_lora_adapter", {"lora_name": f"bad-{name}", "lora_path": path})
    assert refused.status == 400
    body = refused.json()
    assert body["success"] is False
    assert message in body["error_message"]
    assert "a0" in body["loaded_adapters"]
    assert f"bad-{name}" not in body["loaded_adapters"]
    assert f"bad-{name}" not in standin.cards()


def test_a_load_without_a_path_is_a_bad_request(standin: Engine) -> None:
    refused = standin.post("/load_lora_adapter", {"lora_name": "no-path"})
    assert refused.status == 400
    assert refused.json() == refused.json() | {"object": "error", "type": "Bad Request", "param": None, "code": 400}
    assert "Field required" in refused.json()["message"]


def test_adapters_generate_what_peft_generates(standin: Engine, tiny: Path, completions: Refs, chats: Refs) -> None:
    assert standin.text(SERVED) == completions["base"]["text"]
    # The base part of "base:adapter" is not checked.
    assert standin.text(f"{SERVED}:a0") == standin.text("whatever:a0") == completions["a0"]["text"]
    loaded = standin.post("/load_lora_adapter", {"lora_name": "t-a1", "lora_path": adapter(tiny, "a1")})
    assert loaded.status == 200, loaded.raw
    answer = standin.complete(f"{SERVED}:t-a1").json()
    assert answer["choices"][0]["text"] == completions["a1"]["text"]
    assert answer["model"] == f"{SERVED}:t-a1"
    assert answer["object"] == "text_completion"
    prompt_tokens = len(completions["a1"]["prompt_ids"])
    counted = {"prompt_tokens": prompt_tokens, "completion_tokens": TOKENS, "total_tokens": prompt_tokens + TOKENS}
    assert answer["usage"].items() >= counted.items()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert len({completions[name]["text"] for name in ("base", "a0", "a1")}) == 3
    chat = standin.post(
        "/v1/chat/completions",
        {"model": f"{SERVED}:t-a1", "messages": [{"role": "user", "content": PROMPT}], **GREEDY},
    )
    assert chat.status == 200, chat.raw
    assert chat.json()["choices"][0]["message"]["content"] == chats["a1"]["text"]
    assert chat.json()["object"] == "chat.completion"
    assert re.fullmatch("[0-9a-f]{32}", chat.json()["id"])


def test_a_bare_adapter_name_runs_the_base_model(standin: Engine) -> None:
    bare = standin.complete("a0").json()
    assert bare["model"] == "a0"
    assert bare["choices"][0]["text"] == standin.text(SERVED)


def test_the_lora_path_field_selects_the_adapter(standin: Engine) -> None:
    assert standin.text(SERVED, lora_path="a0") == standin.text(f"{SERVED}:a0") != standin.text(SERVED)


def test_native_generate_takes_the_adapter_name(standin: Engine, completions: Refs) -> None:
    request = {
        "input_ids": completions["a0"]["prompt_ids"],
        "sampling_params": {"max_new_tokens": TOKENS, "temperature": 0},
        "lora_path": "a0",
        "return_logprob": True,
    }
    answer = standin.post("/generate", request)
    assert answer.status == 200, answer.raw
    body = answer.json()
    assert body["output_ids"] == completions["a0"]["ids"]
    assert [token for _, token, _ in body["meta_info"]["output_token_logprobs"]] == completions["a0"]["ids"]
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": TOKENS}


def test_an_adapter_never_loaded_is_a_400_with_sglangs_message(standin: Engine) -> None:
    refused = standin.complete(f"{SERVED}:nope")
    assert refused.status == 400
    body = refused.json()
    assert body == body | {"object": "error", "type": "BadRequestError", "param": None, "code": 400}
    assert body["message"].startswith(NEVER_LOADED)
    assert "'a0'" in body["message"]
    # Streamed, the same 400 comes before any event.
    streamed = standin.post(
        "/v1/chat/completions",
        {"model": f"{SERVED}:nope", "messages": [{"role": "user", "content": PROMPT}], "stream": True},
    )
    assert (streamed.status, streamed.content_type) == (400, "application/json")
    assert streamed.json()["message"].startswith(NEVER_LOADED)


def test_unload_hides_the_card_but_a_request_reloads_the_adapter(standin: Engine, tiny: Path) -> None:
    loaded = standin.post("/load_lora_adapter", {"lora_name": "t-unload", "lora_path": adapter(tiny, "a1")})
    assert loaded.status == 200, loaded.raw
    before = standin.text(f"{SERVED}:t-unload")
    unloaded = standin.post("/unload_lora_adapter", {"lora_name": "t-unload"})
    assert unloaded.status == 200
    assert unloaded.json()["success"] is True
    assert "t-unload" not in unloaded.json()["loaded_adapters"]
    assert "t-unload" not in standin.cards()
    # SGLang remembers every name it ever loaded: the request reloads it, and its card is back, last.
    assert standin.text(f"{SERVED}:t-unload") == before
    assert list(standin.cards())[-1] == "t-unload"
    missing = standin.post("/unload_lora_adapter", {"lora_name": "never"})
    assert missing.status == 400
    assert missing.json()["loaded_adapters"] is None
    assert missing.json()["error_message"].startswith("LoRA with name never does not exist. Loaded LoRAs: odict_keys([")


def test_chat_streams_as_sglang_does(standin: Engine) -> None:
    request = {"model": f"{SERVED}:a0", "messages": [{"role": "user", "content": PROMPT}], **GREEDY}
    whole = standin.post("/v1/chat/completions", request).json()
    streamed = standin.post(
        "/v1/chat/completions", request | {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert (streamed.status, streamed.content_type) == (200, "text/event-stream; charset=utf-8")
    events = streamed.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    first, *content, finish, last = chunks
    for chunk in [first, *content, finish]:
        assert list(chunk) == ["id", "object", "created", "model", "choices"]
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == f"{SERVED}:a0"
        assert re.fullmatch("[0-9a-f]{32}", chunk["id"])
    assert first["choices"][0]["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert all(list(chunk["choices"][0]["delta"]) == ["reasoning_content", "content"] for chunk in content)
    assert (
        "".join(chunk["choices"][0]["delta"]["content"] for chunk in content)
        == (whole["choices"][0]["message"]["content"])
    )
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in [first, *content])
    assert (
        finish["choices"][0] | {"delta": {"reasoning_content": None}, "finish_reason": "length"}
        == (finish["choices"][0])
    )
    assert last["choices"] == []
    assert last["usage"] == whole["usage"]


def test_a_client_gone_mid_stream_frees_its_adapter(standin: Engine, tiny: Path) -> None:
    assert standin.post("/load_lora_adapter", {"lora_name": "t-gone", "lora_path": adapter(tiny, "a3")}).status == 200
    request = {"model": f"{SERVED}:t-gone", "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(request), headers={"Content-Type": "application/json"})
    assert conn.getresponse().read(6) == b"data: "
    conn.close()
    # Unload waits for the adapter's requests: it answers once the stand-in has stopped generating.
    began = time.monotonic()
    assert standin.post("/unload_lora_adapter", {"lora_name": "t-gone"}).status == 200
    assert time.monotonic() - began < 20


def test_metrics_carry_sglangs_names_and_labels(standin: Engine) -> None:
    assert standin.text(SERVED)
    metrics = standin.get("/metrics")
    assert (metrics.status, metrics.content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
    text = metrics.raw.decode()
    engine = f'engine_type="unified",model_name="{SERVED}",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
    for name in ("num_running_reqs", "num_queue_reqs", "token_usage", "gen_throughput", "lora_pool_utilization"):
        assert f"sglang:{name}{{{engine}}} " in text, name
    # Slots are those of the running requests: none at idle.
    assert f"sglang:lora_pool_slots_used{{{engine}}} 0.0" in text
    assert f"sglang:lora_pool_slots_total{{{engine}}} 4.0" in text
    request = f'engine_type="unified",model_name="{SERVED}"'
    for name in ("prompt_tokens_total", "generation_tokens_total", "num_requests_total"):
        assert f"sglang:{name}{{{request}}} " in text, name
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds"):
        assert f"# TYPE sglang:{name} histogram" in text
        assert f'sglang:{name}_bucket{{{request},le="+Inf"}} ' in text
    assert 'sglang:http_requests_total{endpoint="/v1/completions",method="POST"} ' in text
    assert not re.search(r"\{[^}]*(adapter|lora_name)=", text)  # no metric is per adapter


def test_a_small_pool_pins_and_evicts_as_sglang_does(engines: dict[str, Engine], tiny: Path, completions: Refs) -> None:
    small = engines["small"]
    pinned = {"lora_name": "p1", "lora_path": adapter(tiny, "a1"), "pinned": True}
    assert small.post("/load_lora_adapter", pinned).status == 200
    # One slot stays free for unpinned adapters and the base model.
    second = small.post("/load_lora_adapter", pinned | {"lora_name": "p2", "lora_path": adapter(tiny, "a2")})
    assert second.status == 400
    assert "It is not allowed to pin all slots" in second.json()["error_message"]
    # A third adapter is past --max-loaded-loras: the least recently used unpinned one (a0) goes.
    third = small.post("/load_lora_adapter", {"lora_name": "b", "lora_path": adapter(tiny, "a3")})
    assert third.status == 200, third.raw
    assert set(third.json()["loaded_adapters"]) == {"p1", "b"}
    assert list(small.cards()) == [SERVED, "p1", "b"]
    # The evicted adapter still answers (reloaded), and now b is the least recently used.
    assert small.text(f"{SERVED}:a0") == completions["a0"]["text"]
    assert list(small.cards()) == [SERVED, "p1", "a0"]


def test_an_expert_adapter_is_statically_paired(engines: dict[str, Engine], tiny: Path, completions: Refs) -> None:
    expert = engines["expert"]
    for path, body in [
        ("/load_lora_adapter", {"lora_name": "a1", "lora_path": adapter(tiny, "a1")}),
        ("/unload_lora_adapter", {"lora_name": "kt"}),
    ]:
        refused = expert.post(path, body)
        assert refused.status == 400
        assert refused.json()["success"] is False
        assert refused.json()["error_message"] == KT_DYNAMIC_REFUSED
    for model in (SERVED, "kt", f"{SERVED}:a0"):
        refused = expert.complete(model)
        assert refused.status == 400, model
        assert "statically paired" in refused.json()["message"]
    # Only the non-expert part applies to the tiny model, and it is a0's.
    assert expert.text(f"{SERVED}:kt") == completions["a0"]["text"]
    assert list(expert.cards()) == [SERVED, "kt"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-paths", "kt={expert}", "a1={a1}", "--disable-cuda-graph"], "KT expert LoRA is statically paired"),
        (["--lora-paths", "kt={expert}"], "CUDA graphs must be off (--disable-cuda-graph)"),
        (
            ["--enable-lora", "--max-lora-rank", "8"],
            "you need to specify both --max-lora-rank and --lora-target-modules",
        ),
        (["--lora-paths", "{a1}", "--max-loaded-loras", "1"], "max_loaded_loras (1) should be greater than or equal"),
        (["--lora-paths", "gone=/nonexistent"], "Failed to load LoRA adapter gone: Repo id must be in the form"),
    ],
    ids=["expert-not-alone", "expert-with-cuda-graphs", "empty-pool-undeclared", "max-loaded-too-small", "missing"],
)
def test_flags_sglang_refuses_stop_the_server_at_once(
    train_python: str, tiny: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    paths = {"expert": adapter(tiny, "expert"), "a1": adapter(tiny, "a1")}
    args = ["--model-path", str(tiny / "model"), *(flag.format(**paths) for flag in flags)]
    engine = launch(train_python, tmp_path, "refused", args)
    try:
        assert engine.proc.wait(timeout=STARTUP_S) != 0
    finally:
        stop(engine)
    assert message in engine.output()
