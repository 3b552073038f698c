"""The router, as ``python -m kimi_operator router ...`` runs it, with a timeline of every request
written to the file named by ROUTER_TRACE (JSON lines), to find where a slow request spent its time.
A diagnosis harness for router_vs_sglang.py; the router's own code is not changed by it.

    ROUTER_TRACE=OUT/router-trace.jsonl python3 traced_router.py router --spec-file ... --engine ...

Each request line: the client's ``x-trace-id`` header, and monotonic times (the same clock as the
driver's ``time.monotonic()``) of: handle entered (``in``); the engine request started, queued for a
connection, a connection created or reused, its headers and body sent, the engine's answer head
(``head``); the answer head and the first events written to the client (``client_head``,
``client_first``); handle left (``out``). Lines ``{"lag": [t, seconds]}`` record each time the event
loop woke more than 10 ms late for a 5 ms timer (the loop blocked).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import sys
import time
import types
from typing import Any

import aiohttp

from kimi_operator.cli import main as cli_main
from kimi_operator.router import app, httpserver
from kimi_operator.router import main as router_main

_TRACE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("trace", default=None)
_OUT = open(os.environ["ROUTER_TRACE"], "a", buffering=1 << 16)  # noqa: SIM115 - open for the process's life


def _stamp(name: str) -> None:
    rec = _TRACE.get()
    if rec is not None and name not in rec:
        rec[name] = time.monotonic()


def _hook(name: str) -> Any:
    async def hook(_session: Any, _ctx: types.SimpleNamespace, _params: Any) -> None:
        _stamp(name)

    return hook


def _trace_config() -> aiohttp.TraceConfig:
    tc = aiohttp.TraceConfig()
    tc.on_request_start.append(_hook("up_start"))
    tc.on_connection_queued_start.append(_hook("queued"))
    tc.on_connection_queued_end.append(_hook("queued_end"))
    tc.on_connection_create_start.append(_hook("conn_new"))
    tc.on_connection_create_end.append(_hook("conn_new_end"))
    tc.on_connection_reuseconn.append(_hook("conn_reused"))
    tc.on_request_headers_sent.append(_hook("up_headers_sent"))
    tc.on_request_chunk_sent.append(_hook("up_body_sent"))
    tc.on_request_end.append(_hook("head"))
    tc.on_request_exception.append(_hook("up_exception"))
    return tc


_session_init = aiohttp.ClientSession.__init__


def _traced_session_init(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
    kwargs["trace_configs"] = [*(kwargs.get("trace_configs") or []), _trace_config()]
    _session_init(self, *args, **kwargs)


_handle = app.Router.handle


async def _traced_handle(self: app.Router, request: httpserver.Request, response: httpserver.Response) -> None:
    trace_id = request.header("x-trace-id")
    if trace_id is None:
        await _handle(self, request, response)
        return
    rec: dict[str, Any] = {"id": trace_id, "in": time.monotonic()}
    token = _TRACE.set(rec)
    try:
        await _handle(self, request, response)
    finally:
        rec["out"] = time.monotonic()
        _TRACE.reset(token)
        _OUT.write(json.dumps(rec) + "\n")


_send = httpserver.Response.send
_start_stream = httpserver.Response.start_stream
_write_many = httpserver.Response.write_many


async def _traced_send(self: httpserver.Response, *args: Any, **kwargs: Any) -> None:
    _stamp("client_first")
    await _send(self, *args, **kwargs)


async def _traced_start_stream(self: httpserver.Response, *args: Any, **kwargs: Any) -> None:
    _stamp("client_head")
    await _start_stream(self, *args, **kwargs)


async def _traced_write_many(self: httpserver.Response, parts: Any) -> None:
    _stamp("client_first")
    await _write_many(self, parts)


async def _lag_monitor() -> None:
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.005)
        late = time.monotonic() - t - 0.005
        if late > 0.010:
            _OUT.write(json.dumps({"lag": [t, round(late, 4)]}) + "\n")
        _OUT.flush()


_serve = router_main.serve


async def _traced_serve(args: Any) -> int:
    monitor = asyncio.ensure_future(_lag_monitor())
    try:
        return await _serve(args)
    finally:
        monitor.cancel()
        _OUT.flush()


aiohttp.ClientSession.__init__ = _traced_session_init  # type: ignore[method-assign]
app.Router.handle = _traced_handle  # type: ignore[method-assign]
httpserver.Response.send = _traced_send  # type: ignore[method-assign]
httpserver.Response.start_stream = _traced_start_stream  # type: ignore[method-assign]
httpserver.Response.write_many = _traced_write_many  # type: ignore[method-assign]
router_main.serve = _traced_serve

if __name__ == "__main__":
    try:
        sys.exit(cli_main())
    finally:
        _OUT.flush()
