"""The router's relay of an engine's stream, in process, byte for byte: each event leaves as its own
chunk as soon as it is whole, however the engine's bytes were cut into reads (several events in one
read, an event or its blank line split across reads), the usage-only event kept only for a client
that asked for usage, and the token counters fed from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from kimi_operator.router import metrics
from kimi_operator.router.app import Keys, Router, error_body
from kimi_operator.router.config import RouterConfig
from kimi_operator.router.fleet import Fleet, Member
from kimi_operator.router.httpserver import Limits, Response, Server

HOST = "127.0.0.1"
SERVED = "relay-model"


def event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


TOKENS = [event({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}) for i in range(4)]
USAGE = event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}})
DONE = b"data: [DONE]\n\n"
EVENTS = [*TOKENS, USAGE, DONE]

# How the engine's stream is cut into writes (each write its own TCP segment, the router reading in
# between): one chunk per event, all at once; several events in one chunk; events and blank lines
# split across chunks.
Script = Callable[[list[bytes]], list[bytes]]
SCRIPTS: dict[str, Script] = {
    "one chunk per event, one write": lambda events: [b"".join(chunk(e) for e in events)],
    "one chunk per event, one write each": lambda events: [chunk(e) for e in events],
    "all events in one chunk": lambda events: [chunk(b"".join(events))],
    "split inside events and blank lines": lambda events: [
        chunk(part) for part in _cut(b"".join(events), [5, len(events[0]) - 1, len(events[0]) + 3, 2])
    ],
}


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    parts, start = [], 0
    for size in sizes:
        parts.append(data[start : start + size])
        start += size
    return [*parts, data[start:]]


async def _engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, writes: list[bytes]) -> None:
    """One engine connection: /v1/models, and a chat stream sent as ``writes``."""
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length:")), 0)
            await reader.readexactly(length)
            if lines[0].startswith("GET /v1/models"):
                body = json.dumps({"object": "list", "data": [{"id": SERVED, "object": "model"}]}).encode()
                head_line = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                writer.write(head_line % len(body))
                writer.write(body)
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for data in writes:
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _serve_router(tmp: Path, engine_port: int) -> AsyncIterator[tuple[int, Router]]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        fleet = Fleet(session)
        fleet.set_members([Member("e0", f"http://{HOST}:{engine_port}", pod_ready=True, dedicated=False)])
        await fleet.poll_all()
        router = Router(fleet, session, Keys(tmp))
        router.set_config(RouterConfig(served=SERVED, adapters=frozenset(), defaults={}))
        server = Server(router.handle, error_body, Limits(), gate=router.gate)
        listener = await server.serve(HOST, 0)
        try:
            yield listener.sockets[0].getsockname()[1], router
        finally:
            listener.close()
            await server.close()


async def _post(port: int, body: dict[str, Any], version: str = "HTTP/1.1") -> tuple[bytes, bytes]:
    """The answer's head and its raw body, read to the close."""
    reader, writer = await asyncio.open_connection(HOST, port)
    data = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions %s\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (version.encode(), len(data), data)
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return head, rest


def _chunks(body: bytes) -> list[bytes]:
    """A chunked body's chunks, in order, checked to end with the last chunk."""
    out = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", body
            return out
        out.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def _tokens(name: str) -> float:
    return REGISTRY.get_sample_value(f"kimi_router_{name}_tokens_total", {"model": SERVED, "key": "none"}) or 0.0


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("include_usage", [False, True])
def test_each_event_is_its_own_chunk_however_the_engine_cut_them(
    tmp_path: Path, script: str, include_usage: bool
) -> None:
    async def run() -> tuple[list[bytes], list[bytes], float, float]:
        writes = SCRIPTS[script](EVENTS)
        engine = await asyncio.start_server(lambda r, w: _engine(r, w, writes), HOST, 0)
        before = _tokens("prompt"), _tokens("completion")
        try:
            async with _serve_router(tmp_path, engine.sockets[0].getsockname()[1]) as (port, _):
                messages = [{"role": "user", "content": "hi"}]
                body: dict[str, Any] = {"model": SERVED, "messages": messages, "stream": True}
                if include_usage:
                    body["stream_options"] = {"include_usage": True}
                head, raw = await _post(port, body)
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert b"Transfer-Encoding: chunked" in head
                _, raw10 = await _post(port, body, version="HTTP/1.0")
                return _chunks(raw), [raw10], _tokens("prompt") - before[0], _tokens("completion") - before[1]
        finally:
            engine.close()

    chunks, (raw10,), prompt, completion = asyncio.run(run())
    expected = EVENTS if include_usage else [e for e in EVENTS if e != USAGE]
    assert chunks == expected
    # HTTP/1.0: no chunks, the events as they are, ended by the close.
    assert raw10 == b"".join(expected)
    # Both requests' usage was counted, asked for or not.
    assert (prompt, completion) == (14, 8)


class _Writer:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    async def drain(self) -> None:
        pass


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("head_only", [False, True])
def test_write_many_sends_the_bytes_of_one_write_per_part_in_one_write(chunked: bool, head_only: bool) -> None:
    parts = [b"data: 1\n\n", b"", b"data: 2\n\n", b"data: [DONE]\n\n"]

    async def run(many: bool) -> list[bytes]:
        writer = _Writer()
        response = Response(writer, keep_alive=True, chunked=chunked, head_only=head_only)  # type: ignore[arg-type]
        if many:
            await response.write_many(parts)
        else:
            for part in parts:
                await response.write(part)
        return writer.writes

    one_each, together = asyncio.run(run(False)), asyncio.run(run(True))
    assert b"".join(together) == b"".join(one_each)
    assert len(together) == (0 if head_only else 1)


def test_the_metric_children_are_the_labelled_ones() -> None:
    child = metrics.child(metrics.RETRIES, "child-test")
    assert child is metrics.RETRIES.labels("child-test")
    assert metrics.child(metrics.RETRIES, "child-test") is child
