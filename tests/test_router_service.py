"""The router as the process it runs as (``python -m kimi_operator router --spec-file ...``) on
127.0.0.1, answering over real sockets.

Its engine is a loopback port nothing listens on, so no request can be generated: a request that is
not refused before the router tries an engine is answered 503 (no ready replica). Every malformed
request must be refused with a 4xx in OpenAI's error shape instead, whatever it is malformed in:
its body (generated from a seeded random generator, so a failure names a case that can be run
again), its HTTP (request line, headers, Content-Length, chunked encoding, another protocol), or its
pace (a head or a body that does not come). The router must still be the same process at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import math
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from kimi_operator.router import requests
from tests.processes import free_port, stop, wait_until

OPERATOR = Path(__file__).resolve().parents[1] / "operator"
HOST = "127.0.0.1"
SERVED = "kimi-k2.5"
ADAPTER = "support"
SEED = 20260130
# Small, so bodies over it are cheap to send.
BODY_LIMIT = 4096
HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 1.0
# No answer may take longer than this (the longest expected is a body timeout).
ANSWER_S = 5.0
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
ERROR_FIELDS = {"message", "type", "param", "code"}


# -- the router process ------------------------------------------------------------------------


@dataclasses.dataclass
class Router:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    """A loopback port that refuses connections: bound, so nothing else takes it, and not listening."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield f"http://{HOST}:{sock.getsockname()[1]}"


def manifest(keys: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": "kimi"},
        "servedModelName": SERVED,
        "adapters": [{"name": ADAPTER, "path": "/adapters/support"}],
        "router": {"maxBodyBytes": BODY_LIMIT},
    }
    if keys:
        spec["router"]["apiKeys"] = keys
    return {"apiVersion": "kimi-operator.io/v1alpha1", "kind": "LoraServer", "metadata": {"name": "t"}, "spec": spec}


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=ANSWER_S)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start_router(root: Path, engine: str, keys: list[dict[str, Any]] | None = None) -> Router:
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "loraserver.yaml"
    spec.write_text(yaml.safe_dump(manifest(keys)))
    (root / "keys").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(OPERATOR)}
    for attempt in range(3):
        # The free port may be taken between finding it and the router binding it: then another.
        port, log = free_port(), root / f"router-{attempt}.log"
        args = [
            *("--spec-file", str(spec), "--engine", f"e0={engine}"),
            *("--host", HOST, "--port", str(port), "--metrics-port", "0", "--keys-dir", str(root / "keys")),
            *("--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT), "--period", "0.5"),
            *("--grace", "1"),
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kimi_operator", "router", *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        router = Router(proc, port, log)
        deadline = time.monotonic() + 30
        while router.alive() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if http_get(port, "/health")[0] == 200:
                    return router
            select.select([], [], [], 0.05)
        stop(router.proc)
        if time.monotonic() >= deadline:
            break
    raise AssertionError(f"the router did not start:\n{router.log_tail()}")


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[Router]:
    """A router without keys."""
    started = start_router(tmp_path_factory.mktemp("open"), engine_url)
    yield started
    stop(started.proc)


# -- answers -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One client connection over a raw socket, kept alive across requests while the router keeps it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = bytearray()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buffer = None, bytearray()

    def send(self, data: bytes, *, half_close: bool = False) -> None:
        if self.sock is None:
            self.sock = socket.create_connection((HOST, self.port), timeout=ANSWER_S)
        # A router that answered early may reset a send; the answer is what is checked.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            self.sock.sendall(data)
            if half_close:
                self.sock.shutdown(socket.SHUT_WR)

    def answer(self) -> Answer | None:
        """The next answer (1xx skipped); None when the router closed without one."""
        assert self.sock is not None
        deadline = time.monotonic() + ANSWER_S
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                lines = self.buffer[:end].decode("latin-1").split("\r\n")
                assert lines[0].startswith("HTTP/1.1 "), lines[0]
                status = int(lines[0].split(" ")[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                if 100 <= status < 200:
                    del self.buffer[: end + 4]
                    continue
                length = int(headers.get("content-length", "0"))
                if len(self.buffer) >= end + 4 + length:
                    body = bytes(self.buffer[end + 4 : end + 4 + length])
                    del self.buffer[: end + 4 + length]
                    if headers.get("connection", "").lower() == "close":
                        self.close()
                    return Answer(status, headers, body)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no answer in {ANSWER_S} s (a hang); read so far: {bytes(self.buffer)[:300]!r}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                assert not self.buffer, f"closed in the middle of an answer: {bytes(self.buffer)[:300]!r}"
                self.close()
                return None
            self.buffer.extend(data)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Answer:
        head = [f"{method} {path} HTTP/1.1", "Host: router", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.send(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        found = self.answer()
        assert found is not None, f"{method} {path}: closed without an answer"
        return found


def raw_exchange(port: int, data: bytes, *, half_close: bool = False) -> Answer | None:
    conn = Conn(port)
    try:
        conn.send(data, half_close=half_close)
        return conn.answer()
    finally:
        conn.close()


def assert_openai_error(status: int, body: bytes, what: str) -> dict[str, Any]:
    """A 4xx, and where there is a body, OpenAI's error shape."""
    assert 400 <= status < 500, f"{what}: {status} {body[:300]!r}"
    if not body:
        return {}
    found = json.loads(body)
    assert isinstance(found, dict), f"{what}: {body[:300]!r}"
    assert set(found) == {"error"}, f"{what}: {body[:300]!r}"
    error = found["error"]
    assert set(error) == ERROR_FIELDS, f"{what}: {body[:300]!r}"
    for name in ("message", "type"):
        assert isinstance(error[name], str), what
        assert error[name], what
    assert error["param"] is None or isinstance(error["param"], str), what
    assert error["code"] is not None, what
    return dict(error)


def assert_refused(answer: Answer | None, what: str) -> dict[str, Any]:
    assert answer is not None, f"{what}: closed without an answer"
    if answer.body:
        assert answer.headers.get("content-type") == "application/json", what
    return assert_openai_error(answer.status, answer.body, what)


# -- malformed bodies, generated ---------------------------------------------------------------

NAN, INF = math.nan, math.inf
# For each checked field, values its type rule refuses (None is "not given" for all but these).
WRONG: dict[str, list[Any]] = {
    "model": [None, 1, 1.5, True, [], {}, [SERVED], {"name": SERVED}],
    "messages": [
        None,
        [],
        "hi",
        {},
        1,
        True,
        [1],
        [None],
        ["hi"],
        [{"content": "x"}],
        [{"role": ""}],
        [{"role": 1, "content": "x"}],
        [{"role": "user", "content": 1}],
        [{"role": "user", "content": {}}],
        [*MESSAGES, {"role": "user", "content": False}],
    ],
    "prompt": [None, [], 1, {}, True, [1, "a"], [[]], [[1, "a"]], [True], [None], [[1], 2]],
    "stream": ["true", 1, 0, [], {}],
    "stream_options": ["x", 1, [], True, {"include_usage": "yes"}, {"include_usage": 1}],
    "echo": ["true", 1, []],
    "user": [1, [], {}, True],
    "stop": [1, [1], ["a", None], {}, True, [[]]],
    "logit_bias": [[], "x", 1, True],
    "tools": [{}, "x", 1, True],
    "chat_template_kwargs": [[], "x", 1, True],
}
for _name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
    WRONG[_name] = ["1", True, False, [], {}, [1.0], NAN, INF, -INF]
for _name in ("max_tokens", "max_completion_tokens", "min_tokens", "n", "seed", "top_k", "top_logprobs", "best_of"):
    WRONG[_name] = [1.5, 100.0, "1", True, [], {}, NAN, INF]
# Valid optional fields, added at random around the one thing that is wrong.
NOISE: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "max_tokens": 16,
    "seed": 3,
    "stop": ["\n"],
    "stream": False,
    "top_k": 5,
    "min_p": 0.05,
    "user": "fuzz",
    "n": 1,
    "logit_bias": {},
    "chat_template_kwargs": {"thinking": False},
    "regex": "[a-z]+",
    "priority": 1,
}
MODELS = [SERVED, ADAPTER, f"{SERVED}:{ADAPTER}"]
KINDS = [
    "wrong-type",
    "unknown-field",
    "lora-path",
    "missing",
    "not-an-object",
    "random-bytes",
    "truncated",
    "trailing",
    "non-utf8",
    "unknown-model",
    "other-endpoint",
    "nested-unknown",
]


def valid_body(rng: random.Random, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": rng.choice(MODELS)}
    body["messages" if chat else "prompt"] = MESSAGES if chat else rng.choice(["hi", ["a", "b"], [1, 2], [[1], [2]]])
    for name in rng.sample(sorted(NOISE), rng.randint(0, 3)):
        body[name] = NOISE[name]
    return body


def random_name(rng: random.Random) -> str:
    alphabet = 'abcdefghijklmnopqrstuvwxyz_ABC0123456789-é中\u0000"\\'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))


def malformed_body(rng: random.Random) -> tuple[str, bytes, str]:  # noqa: PLR0912 (one branch a kind)
    """(path, body, what is wrong): a body no check may let through to an engine."""
    chat = rng.random() < 0.5
    path = CHAT if chat else COMPLETIONS
    body = valid_body(rng, chat)
    kind = rng.choice(KINDS)
    what = kind
    if kind == "wrong-type":
        name = rng.choice(sorted(WRONG))
        body[name] = rng.choice(WRONG[name])
        what = f"{kind} {name}={body[name]!r}"
    elif kind == "unknown-field":
        name = random_name(rng)
        while name in requests.CHAT_FIELDS | requests.COMPLETION_FIELDS:
            name = random_name(rng)
        body[name] = rng.choice([1, "x", None, [], {}, True])
        what = f"{kind} {name!r}"
    elif kind == "lora-path":
        body["lora_path"] = rng.choice(["/adapters/other", "support", None, 1, ["x"], ""])
    elif kind == "missing":
        name = rng.choice(["model", "messages" if chat else "prompt"])
        del body[name]
        what = f"{kind} {name}"
    elif kind == "not-an-object":
        return path, json.dumps(rng.choice([[], [body], "hi", 1, 1.5, None, True, False])).encode(), kind
    elif kind == "random-bytes":
        return path, rng.randbytes(rng.randint(0, 400)), kind
    elif kind == "truncated":
        text = json.dumps(body).encode()
        return path, text[: rng.randrange(len(text))], kind
    elif kind == "trailing":
        text = json.dumps(body)
        return path, (text[:-1] + rng.choice([",}", "}}", "} x", "}]", "}\x00", "},{}"])).encode(), kind
    elif kind == "non-utf8":
        text = json.dumps(body, ensure_ascii=False).encode()
        at = rng.randrange(1, len(text))
        bad = rng.choice([b"\xff", b"\xfe\xff", b"\xc3", b"\xc0\xaf", b"\x80", b"\xf8\x88\x80\x80\x80"])
        return path, text[:at] + bad + text[at:], kind
    elif kind == "unknown-model":
        body["model"] = rng.choice(["", "gpt-4o", f"{SERVED}:", f"{SERVED}:retired", f"other:{ADAPTER}", "SUPPORT"])
        what = f"{kind} {body['model']!r}"
    elif kind == "other-endpoint":
        path = COMPLETIONS if chat else CHAT
    elif kind == "nested-unknown":
        # Nested well within what the JSON reader takes (see test_deeply_nested_json_is_refused).
        depth = rng.randint(1, 400)
        body["nested"] = json.loads("[" * depth + "]" * depth)
    return path, json.dumps(body).encode(), what


def malformed_bodies(count: int, seed: int) -> list[tuple[str, bytes, str]]:
    rng = random.Random(seed)  # noqa: S311 (a reproducible test, not security)
    return [malformed_body(rng) for _ in range(count)]


def test_the_generated_bodies_are_all_malformed() -> None:
    """The generator itself: each body fails the checks, or is no JSON object, or names no model
    served (404): none of them is a request an engine could be sent."""
    for i, (path, body, what) in enumerate(malformed_bodies(3000, SEED)):
        try:
            parsed = json.loads(body)
            requests.check(parsed, chat=path == CHAT)
        except ValueError:  # not JSON, not UTF-8 or refused
            continue
        assert parsed["model"] not in MODELS, f"case {i} ({what}) is a valid request: {body[:200]!r}"


# -- malformed HTTP, generated -----------------------------------------------------------------

GOOD_HEAD = "POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
BAD_BODY = b'{"model": "kimi-k2.5"}'


def chunked(*chunks: bytes, end: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + end


def malformed_http(rng: random.Random) -> tuple[bytes, bool, str]:  # noqa: PLR0911, PLR0912
    """(bytes, half-close after them, what is wrong): a request that is not HTTP/1.1 the router can
    read, or that it must refuse as it reads it."""
    kind = rng.randrange(14)
    if kind == 0:
        line = rng.choice(
            [
                "GET /health",
                "GET  /health HTTP/1.1",
                "GET /health HTTP/1.1 extra",
                "/health HTTP/1.1",
                "G3T /health HTTP/1.1",
                "G-T /health HTTP/1.1",
                "GET /health HTTP/2.0",
                "GET /health HTTP/1.2",
                "GET /health HTTP/0.9",
                "GET /health http/1.1",
                "GET /health FOO/1.1",
                "",
                " GET /health HTTP/1.1",
                "GET\t/health\tHTTP/1.1",
                "GET /health\x00 HTTP/1.1",
                "GET",
                "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 HTTP/1.1",
            ]
        )
        return f"{line}\r\nHost: router\r\n\r\n".encode("latin-1"), False, f"request line {line!r}"
    if kind == 1:
        line = rng.choice(
            [
                "NoColon",
                "Bad Name: x",
                "Name : x",
                " Folded: x",
                "\tFolded: x",
                "Na(me: x",
                "Na/me: x",
                "Name\x00: x",
                ": empty-name",
                "Name: va\x00lue",
                "Name: a\rb",
                "Name: a\nb",
                "Name: a\x1bb",
                "Name: a\x7fb",
                "N\xe9me: x",
                "Content-Length: 2\r\nContent-Length: 2",
                "Host: other",
                "Authorization: Bearer a\r\nAuthorization: Bearer b",
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            ]
        )
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\n{line}\r\n\r\n".encode("latin-1")
        return head, False, f"header {line!r}"
    if kind == 2:
        value = rng.choice(
            [
                "-1",
                "abc",
                "1.5",
                "0x10",
                "+5",
                "5 5",
                "",
                "1e3",
                "\xb2",
                "\xb3",
                "\xb9",
                "\xbd",
                "12\xb2",
                "٣",
                "9" * 5000,
            ]
        )
        head = GOOD_HEAD + f"Content-Length: {value}\r\n\r\n"
        return head.encode("utf-8" if value == "٣" else "latin-1") + BAD_BODY, False, f"Content-Length {value[:20]!r}"
    if kind == 3:
        # Over the body limit, said by Content-Length (answered before the body is read).
        size = rng.choice([BODY_LIMIT + 1, BODY_LIMIT * 4, 10**12, 10**30])
        expect = rng.choice(["", "Expect: 100-continue\r\n"])
        head = (GOOD_HEAD + f"Content-Length: {size}\r\n{expect}\r\n").encode()
        body = b"x" * min(size, BODY_LIMIT * 2) if not expect else b""
        return head + body, False, f"Content-Length {size} over the limit"
    if kind == 4:
        # Chunked encoding that is not.
        body = rng.choice(
            [
                b"zz\r\n{}\r\n0\r\n\r\n",
                b"0x2\r\n{}\r\n0\r\n\r\n",
                b"-1\r\n{}\r\n0\r\n\r\n",
                b"+2\r\n{}\r\n0\r\n\r\n",
                b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n",
                b"\r\n{}\r\n0\r\n\r\n",
                b" \r\n0\r\n\r\n",
                b"2\r\n{}XX0\r\n\r\n",
                b"2\r\n{}",
                b"1" * 2000 + b"\r\n",
                b"2;" + b"e" * 2000 + b"\r\n{}\r\n0\r\n\r\n",
                b"\xff\r\n",
                b"2\n{}\n0\n\n",
            ]
        )
        head = GOOD_HEAD + "Transfer-Encoding: chunked\r\n\r\n"
        return head.encode() + body, True, f"chunked {body[:40]!r}"
    if kind == 5:
        # Chunked over the limit: one chunk, or many.
        body = rng.choice(
            [
                b"%x\r\n" % (BODY_LIMIT + 1) + b"x" * (BODY_LIMIT + 1) + b"\r\n0\r\n\r\n",
                b"f" * 100 + b"\r\n",
                b"000000000000000000000000001000000\r\n",
                chunked(*[b"x" * 1000] * 5),
            ]
        )
        head = GOOD_HEAD + "Transfer-Encoding: chunked\r\n\r\n"
        return head.encode() + body, False, f"chunked over the limit {body[:40]!r}"
    if kind == 6:
        te = rng.choice(["gzip", "chunked, gzip", "gzip, chunked", "identity", "chunked;q=1", "x"])
        head = GOOD_HEAD + f"Transfer-Encoding: {te}\r\n\r\n"
        return head.encode() + chunked(BAD_BODY), False, f"Transfer-Encoding {te}"
    if kind == 7:
        head = GOOD_HEAD + f"Transfer-Encoding: chunked\r\nContent-Length: {len(BAD_BODY)}\r\n\r\n"
        return head.encode() + chunked(BAD_BODY), False, "Transfer-Encoding and Content-Length"
    if kind == 8:
        return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(rng.randint(0, 64)), False, "HTTP/2 preface"
    if kind == 9:
        return rng.randbytes(rng.randint(1, 3000)), True, "random bytes"
    if kind == 10:
        # A head cut anywhere, then the client's end.
        full = (GOOD_HEAD + "Content-Length: 22\r\n\r\n").encode()
        return full[: rng.randrange(1, len(full) - 1)], True, "truncated head"
    if kind == 11:
        # A body shorter than its Content-Length, then the client's end.
        return (GOOD_HEAD + "Content-Length: 100\r\n\r\n").encode() + BAD_BODY, True, "truncated body"
    if kind == 12:
        # Too many headers, or too long a head (sent at once, and in pieces).
        if rng.random() < 0.5:
            extra = "".join(f"X-H{i}: v\r\n" for i in range(101))
        else:
            extra = f"X-Long: {'v' * rng.choice([33 * 1024, 70 * 1024])}\r\n"
        return (GOOD_HEAD + extra + "\r\n").encode(), False, "too much head"
    # Readable HTTP whose body is not UTF-8 or not JSON, sent chunked, with bytes of every kind in
    # a header value (obs-text, which HTTP allows).
    body = rng.choice([b"\xff\xfe{}", BAD_BODY, rng.randbytes(50), b'{"model": "k\xe9"}'])
    head = GOOD_HEAD.encode() + b"X-Note: caf\xe9 \xff\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + chunked(body[:20], body[20:]), False, f"chunked body {body[:30]!r}"


def malformed_requests(count: int, seed: int) -> list[tuple[bytes, bool, str]]:
    rng = random.Random(seed)  # noqa: S311 (a reproducible test, not security)
    return [malformed_http(rng) for _ in range(count)]


# -- the fuzz test -----------------------------------------------------------------------------


def well_formed(model: str = SERVED) -> bytes:
    return json.dumps({"model": model, "messages": MESSAGES}).encode()


async def _with_aiohttp(port: int, cases: list[tuple[str, bytes, str]]) -> list[tuple[int, bytes, str]]:
    """Malformed bodies, and bodies over the limit (plain and chunked), over aiohttp, 8 at a time."""
    found: list[tuple[int, bytes, str]] = []
    gate = asyncio.Semaphore(8)
    timeout = aiohttp.ClientTimeout(total=ANSWER_S * 2)
    async with aiohttp.ClientSession(f"http://{HOST}:{port}", timeout=timeout) as session:

        async def one(path: str, body: bytes, what: str, chunks: bool = False) -> None:
            async with gate:
                data: Any = body
                if chunks:

                    async def pieces() -> Any:
                        for i in range(0, len(body), 1000):
                            yield body[i : i + 1000]

                    data = pieces()
                async with session.post(path, data=data, headers={"Content-Type": "application/json"}) as resp:
                    found.append((resp.status, await resp.read(), what))

        jobs = [one(*case) for case in cases]
        jobs += [one(CHAT, b"x" * (BODY_LIMIT + 1), "aiohttp over the limit")]
        jobs += [one(CHAT, b"x" * 2 * 1024 * 1024, "aiohttp 2 MiB")]
        jobs += [one(CHAT, b"x" * 64 * 1024, "aiohttp chunked over the limit", True)]
        await asyncio.gather(*jobs)
    return found


def test_malformed_requests_are_refused_with_a_4xx_and_never_reach_an_engine(router: Router) -> None:
    pid = router.proc.pid
    bodies = malformed_bodies(2000, SEED)
    checked = 0

    # Over raw keep-alive connections: the router keeps a connection after a refused body.
    conn = Conn(router.port)
    try:
        for i, (path, body, what) in enumerate(bodies[:1000]):
            answer = conn.request("POST", path, body, {"Content-Type": "application/json"})
            assert_refused(answer, f"raw body case {i}: {what}")
            checked += 1
    finally:
        conn.close()

    # Over http.client (keep-alive too), with bodies over the limit among them.
    client = http.client.HTTPConnection(HOST, router.port, timeout=ANSWER_S)
    extra = [
        (CHAT, b"x" * (BODY_LIMIT + 1), "over the limit by one"),
        (COMPLETIONS, b"{" * (64 * 1024), "64 KiB"),
        (CHAT, b"x" * (8 * 1024 * 1024), "8 MiB"),
    ]
    try:
        for i, (path, body, what) in enumerate([*bodies[1000:1500], *extra]):
            client.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = client.getresponse()
            assert_openai_error(resp.status, resp.read(), f"http.client case {i}: {what}")
            checked += 1
        # Chunked by http.client itself, over the limit.
        pieces = iter([b"x" * 1000] * 10)
        client.request("POST", CHAT, body=pieces, headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        resp = client.getresponse()
        assert resp.status == 413
        assert_openai_error(resp.status, resp.read(), "http.client chunked over the limit")
        # Headers http.client lets through as given.
        for value in ("abc", "-5", "0x10", "5000000"):
            client.putrequest("POST", CHAT)
            client.putheader("Content-Length", value)
            client.endheaders(b"{}")
            resp = client.getresponse()
            assert_openai_error(resp.status, resp.read(), f"http.client Content-Length {value}")
            checked += 1
    finally:
        client.close()

    for status, body, what in asyncio.run(_with_aiohttp(router.port, bodies[1500:])):
        assert_openai_error(status, body, f"aiohttp: {what}")
        checked += 1

    # Malformed HTTP over raw sockets, a connection each.
    for i, (data, half_close, what) in enumerate(malformed_requests(1000, SEED + 1)):
        answer = raw_exchange(router.port, data, half_close=half_close)
        refused = assert_refused(answer, f"raw HTTP case {i}: {what}")
        assert refused.get("code") != "no_replica", f"raw HTTP case {i}: {what}"
        checked += 1

    assert checked > 3000
    # The same process, alive, and serving.
    assert router.proc.pid == pid
    assert router.alive(), router.log_tail()
    assert http_get(router.port, "/health") == (200, b'{"status":"ok"}')
    log = router.log.read_text(errors="replace")
    assert "Traceback" not in log, router.log_tail()


def test_expected_refusals(router: Router) -> None:
    """The status each kind of malformed request gets."""
    cases: list[tuple[bytes, bool, int]] = [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False, 400),
        ((GOOD_HEAD + "Content-Length: \xb2\r\n\r\n").encode("latin-1"), False, 400),
        ((GOOD_HEAD + f"Content-Length: {'9' * 5000}\r\n\r\n").encode(), False, 413),
        ((GOOD_HEAD + f"Content-Length: {BODY_LIMIT + 1}\r\n\r\n").encode(), False, 413),
        ((GOOD_HEAD + "Transfer-Encoding: gzip\r\n\r\n").encode(), False, 400),
        ((GOOD_HEAD + "Transfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n").encode(), False, 400),
        ((GOOD_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"f" * 30 + b"\r\n", False, 413),
        ((GOOD_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"1" * 2000 + b"\r\n", False, 400),
        ((GOOD_HEAD + "X-Big: " + "v" * (70 * 1024) + "\r\n\r\n").encode(), False, 431),
        ((GOOD_HEAD + "".join(f"X-{i}: v\r\n" for i in range(101)) + "\r\n").encode(), False, 431),
        ((GOOD_HEAD + "Name: a\x00b\r\n\r\n").encode(), False, 400),
        ((GOOD_HEAD + "Content-Length: 100\r\n\r\n{}").encode(), True, 400),
        (GOOD_HEAD.encode()[:30], True, 400),
        ((GOOD_HEAD + "Content-Length: 2\r\n\r\n{]").encode(), False, 400),
        ((GOOD_HEAD + "Content-Length: 6\r\n\r\n").encode() + b'"\xff\xfe"\r\n', False, 400),
    ]
    for i, (data, half_close, status) in enumerate(cases):
        answer = raw_exchange(router.port, data, half_close=half_close)
        assert answer is not None, f"case {i}"
        assert answer.status == status, f"case {i}: {answer}"
        assert_refused(answer, f"case {i}")


def test_a_body_over_the_limit_is_a_413_the_client_reads(router: Router) -> None:
    """The router answers before the body is read and then drops what still comes: the client,
    still sending, gets the 413 rather than a reset connection."""
    for size in (BODY_LIMIT + 1, 1024 * 1024, 16 * 1024 * 1024):
        client = http.client.HTTPConnection(HOST, router.port, timeout=ANSWER_S)
        try:
            client.request("POST", CHAT, body=b"x" * size, headers={"Content-Type": "application/json"})
            resp = client.getresponse()
            error = assert_openai_error(resp.status, resp.read(), f"{size} bytes")
            assert resp.status == 413
            assert str(BODY_LIMIT) in error["message"]
        finally:
            client.close()


def test_deeply_nested_json_is_refused(router: Router) -> None:
    conn = Conn(router.port)
    try:
        answer = conn.request("POST", CHAT, b"[" * 3000, {"Content-Type": "application/json"})
    finally:
        conn.close()
    assert_refused(answer, "3000 nested lists")


def test_a_well_formed_request_without_an_engine_is_a_503_with_retry_after(router: Router) -> None:
    conn = Conn(router.port)
    try:
        for path, body in (
            (CHAT, well_formed()),
            (COMPLETIONS, json.dumps({"model": ADAPTER, "prompt": "x"}).encode()),
        ):
            answer = conn.request("POST", path, body, {"Content-Type": "application/json"})
            assert answer.status == 503, answer
            assert answer.headers.get("retry-after") == "5"
            error = answer.json()["error"]
            assert set(error) == ERROR_FIELDS
            assert error["code"] == "no_replica"
            assert error["type"] == "server_error"
    finally:
        conn.close()


# -- slow clients ------------------------------------------------------------------------------


def readable(sock: socket.socket, seconds: float) -> bool:
    return bool(select.select([sock], [], [], seconds)[0])


def read_answer(sock: socket.socket) -> Answer | None:
    conn = Conn(0)
    conn.sock = sock
    return conn.answer()


def test_a_slow_head_gets_408_while_others_are_served(router: Router) -> None:
    began = time.monotonic()
    slow = []
    for _ in range(20):
        sock = socket.create_connection((HOST, router.port), timeout=ANSWER_S)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Le")
        slow.append(sock)
    try:
        # Meanwhile, others are answered.
        conn = Conn(router.port)
        try:
            for _ in range(5):
                assert conn.request("GET", "/health").status == 200
                answer = conn.request("POST", CHAT, b"{}", {"Content-Type": "application/json"})
                assert answer.status == 400
        finally:
            conn.close()
        served = time.monotonic() - began
        for sock in slow:
            answer = read_answer(sock)
            assert answer is not None
            assert answer.status == 408, answer
            assert_refused(answer, "slow head")
        waited = time.monotonic() - began
    finally:
        for sock in slow:
            sock.close()
    # The others were answered before the slow heads' time was up: not held up behind them.
    assert served < HEADER_TIMEOUT
    assert HEADER_TIMEOUT * 0.8 <= waited < ANSWER_S


def test_a_head_sent_byte_by_byte_gets_408_by_the_header_timeout(router: Router) -> None:
    """A slow-header client that keeps sending: the timeout counts from the head's first byte."""
    head = (GOOD_HEAD + "X-Padding: " + "p" * 400 + "\r\n\r\n").encode()
    with socket.create_connection((HOST, router.port), timeout=ANSWER_S) as sock:
        began = time.monotonic()
        sent = 0
        # One byte every 20 ms (the whole head would take 10 s) until the router answers.
        while sent < len(head) and not readable(sock, 0.02):
            sock.sendall(head[sent : sent + 1])
            sent += 1
        answer = read_answer(sock)
        waited = time.monotonic() - began
    assert sent < len(head)
    assert answer is not None
    assert answer.status == 408
    assert_refused(answer, "byte by byte")
    assert waited < HEADER_TIMEOUT + 2


def test_a_body_that_does_not_come_gets_408(router: Router) -> None:
    with socket.create_connection((HOST, router.port), timeout=ANSWER_S) as sock:
        began = time.monotonic()
        sock.sendall((GOOD_HEAD + "Content-Length: 100\r\n\r\n").encode() + b'{"model"')
        answer = read_answer(sock)
        waited = time.monotonic() - began
    assert answer is not None
    assert answer.status == 408
    assert_refused(answer, "slow body")
    assert BODY_TIMEOUT * 0.8 <= waited < BODY_TIMEOUT + 2


# -- probes and routes -------------------------------------------------------------------------


def test_probes(router: Router) -> None:
    assert http_get(router.port, "/health") == (200, b'{"status":"ok"}')
    # No engine answers: not ready, so a Service sends the router nothing.
    status, body = http_get(router.port, "/ready")
    assert status == 503
    assert json.loads(body) == {"status": "no ready replica known"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 404),
        ("GET", "/v1", 404),
        ("POST", "/v1/embeddings", 404),
        ("GET", "/v1/chat/completions/", 404),
        ("GET", "/V1/MODELS", 404),
        ("GET", "/metrics", 404),
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/v1/completions", 405),
        ("POST", "/health", 405),
        ("DELETE", "/v1/models", 405),
        ("TRACE", "/ready", 405),
        ("PATCH", "/v1/chat/completions?x=1", 405),
    ],
)
def test_unknown_paths_and_wrong_methods(router: Router, method: str, path: str, status: int) -> None:
    conn = Conn(router.port)
    try:
        answer = conn.request(method, path, b"{}" if method in ("POST", "PUT", "PATCH") else b"")
    finally:
        conn.close()
    assert answer.status == status
    error = assert_refused(answer, f"{method} {path}")
    if status == 405:
        assert method in error["message"]
    else:
        assert error["code"] == "not_found"


def test_head_is_the_head_of_get_without_a_body_and_the_connection_stays_usable(router: Router) -> None:
    conn = http.client.HTTPConnection(HOST, router.port, timeout=5)
    try:
        conn.request("HEAD", "/health")
        head = conn.getresponse()
        assert head.status == 200
        assert head.read() == b""
        assert int(head.getheader("Content-Length") or 0) > 0
        # The same connection: no body was left on it to be read as the next answer.
        conn.request("GET", "/health")
        again = conn.getresponse()
        assert again.status == 200
        assert json.loads(again.read()) == {"status": "ok"}
    finally:
        conn.close()


def test_models_without_keys(router: Router) -> None:
    status, body = http_get(router.port, "/v1/models")
    assert status == 200
    # Only the base model: no engine lists the adapter.
    assert [card["id"] for card in json.loads(body)["data"]] == [SERVED]


# -- keys --------------------------------------------------------------------------------------

BASE_KEY, ADAPTER_KEY, ROTATED = "sk-base-1f2e", "sk-support-9a8b", "sk-base-rotated-77c1"
KEYS = [
    {"id": "base", "secretKeyRef": {"name": "base-key", "key": "token"}, "models": [SERVED]},
    {"id": "support", "secretKeyRef": {"name": "team-keys", "key": "support"}, "models": [ADAPTER]},
]


def write_key(keys: Path, secret: str, key: str, value: str) -> None:
    """As the kubelet does: the new file whole, put in place at once."""
    (keys / secret).mkdir(parents=True, exist_ok=True)
    partial = keys / secret / f".{key}.partial"
    partial.write_text(value + "\n")
    partial.replace(keys / secret / key)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[Router]:
    root = tmp_path_factory.mktemp("keyed")
    write_key(root / "keys", "base-key", "token", BASE_KEY)
    write_key(root / "keys", "team-keys", "support", ADAPTER_KEY)
    started = start_router(root, engine_url, KEYS)
    yield started
    stop(started.proc)


def generate(router: Router, model: str, key: str | None, path: str = CHAT) -> Answer:
    body = json.dumps({"model": model, "messages": MESSAGES} if path == CHAT else {"model": model, "prompt": "x"})
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = key if " " in key else f"Bearer {key}"
    conn = Conn(router.port)
    try:
        return conn.request("POST", path, body.encode(), headers)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("model", "key", "status", "code"),
    [
        (SERVED, None, 401, "invalid_api_key"),
        (SERVED, "sk-wrong", 401, "invalid_api_key"),
        (SERVED, "", 401, "invalid_api_key"),
        (SERVED, f"Basic {BASE_KEY}", 401, "invalid_api_key"),
        (SERVED, f"Bearer {BASE_KEY}x", 401, "invalid_api_key"),
        (SERVED, BASE_KEY[:-1], 401, "invalid_api_key"),
        # A key for another model.
        (ADAPTER, BASE_KEY, 403, "model_not_allowed"),
        (f"{SERVED}:{ADAPTER}", BASE_KEY, 403, "model_not_allowed"),
        (SERVED, ADAPTER_KEY, 403, "model_not_allowed"),
        # Allowed: past the keys, to no engine.
        (SERVED, BASE_KEY, 503, "no_replica"),
        (SERVED, f"bearer   {BASE_KEY}  ", 503, "no_replica"),
        (ADAPTER, ADAPTER_KEY, 503, "no_replica"),
        (f"{SERVED}:{ADAPTER}", ADAPTER_KEY, 503, "no_replica"),
    ],
)
def test_keys(keyed: Router, model: str, key: str | None, status: int, code: str) -> None:
    answer = generate(keyed, model, key)
    assert answer.status == status, answer
    error = answer.json()["error"]
    assert set(error) == ERROR_FIELDS
    assert error["code"] == code
    if status == 503:
        assert answer.headers.get("retry-after") == "5"
    # A key never appears in an answer.
    assert BASE_KEY.encode() not in answer.body
    assert ADAPTER_KEY.encode() not in answer.body


def test_models_needs_a_key(keyed: Router) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": BASE_KEY}):
        status, body = http_get(keyed.port, "/v1/models", headers)
        assert status == 401
        assert assert_openai_error(status, body, "models")["code"] == "invalid_api_key"
    status, body = http_get(keyed.port, "/v1/models", {"Authorization": f"Bearer {BASE_KEY}"})
    assert status == 200
    assert [card["id"] for card in json.loads(body)["data"]] == [SERVED]
    # The adapter key sees no model: the base is not its, and no engine lists the adapter.
    status, body = http_get(keyed.port, "/v1/models", {"Authorization": f"Bearer {ADAPTER_KEY}"})
    assert status == 200
    assert json.loads(body)["data"] == []


def test_the_official_client_reads_the_refusals(keyed: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", HOST)

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=key, max_retries=0, timeout=ANSWER_S)

    with pytest.raises(openai.AuthenticationError) as refused:
        client("sk-wrong").chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(BASE_KEY).chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": "hi"}])
    assert denied.value.code == "model_not_allowed"
    assert denied.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client(BASE_KEY).completions.create(model=SERVED, prompt="x", extra_body={"lora_path": "/adapters/other"})
    assert bad.value.param == "lora_path"
    with pytest.raises(openai.NotFoundError) as missing:
        client(BASE_KEY).completions.create(model="gpt-4o", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong").models.list()


def test_a_rotated_key_takes_effect_without_a_restart(keyed: Router) -> None:
    pid = keyed.proc.pid
    keys = keyed.log.parent / "keys"
    write_key(keys, "base-key", "token", ROTATED)
    try:
        wait_until(lambda: generate(keyed, SERVED, ROTATED).status == 503, 10, "the new key accepted")
        assert generate(keyed, SERVED, BASE_KEY).status == 401
        # The other key is untouched.
        assert generate(keyed, ADAPTER, ADAPTER_KEY).status == 503
        # A key whose file goes away is refused, and the others still work.
        (keys / "team-keys" / "support").unlink()
        wait_until(lambda: generate(keyed, ADAPTER, ADAPTER_KEY).status == 401, 10, "the removed key refused")
        assert generate(keyed, SERVED, ROTATED).status == 503
    finally:
        write_key(keys, "base-key", "token", BASE_KEY)
        write_key(keys, "team-keys", "support", ADAPTER_KEY)
    wait_until(lambda: generate(keyed, SERVED, BASE_KEY).status == 503, 10, "the first key back")
    wait_until(lambda: generate(keyed, ADAPTER, ADAPTER_KEY).status == 503, 10, "the adapter key back")
    assert keyed.proc.pid == pid
    assert keyed.alive()


def test_without_a_key_nothing_is_said_of_the_models(keyed: Router) -> None:
    assert generate(keyed, ADAPTER, None).status == 401
    assert generate(keyed, "no-such-adapter", None).status == 401
    assert generate(keyed, "no-such-adapter", "sk-wrong").status == 401


@pytest.fixture(scope="module")
def unreadable_keys(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[Router]:
    """Keys in the spec, none of their files there."""
    started = start_router(tmp_path_factory.mktemp("no-key-files"), engine_url, KEYS)
    yield started
    stop(started.proc)


@pytest.mark.parametrize("key", [None, "", "sk-wrong", BASE_KEY, ADAPTER_KEY])
def test_keys_none_of_which_can_be_read_refuse_everything(unreadable_keys: Router, key: str | None) -> None:
    for model in (SERVED, ADAPTER):
        answer = generate(unreadable_keys, model, key)
        assert answer.status == 401, answer
        assert answer.json()["error"]["code"] == "invalid_api_key"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    assert http_get(unreadable_keys.port, "/v1/models", headers)[0] == 401
    assert http_get(unreadable_keys.port, "/health")[0] == 200
    log = unreadable_keys.log.read_text(errors="replace")
    assert "base-key/token cannot be read" in log
