"""The router's OpenAI surface: each request checked, its key and model resolved, and sent to a
replica whose engine lists its adapter, as ``"<served>:<adapter>"``; the answer passed back as the
engine sends it (a stream event by event).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from kimi_operator.router import metrics, requests
from kimi_operator.router.config import RouterConfig, read_keys
from kimi_operator.router.defaults import merged
from kimi_operator.router.fleet import Engine, Fleet
from kimi_operator.router.httpserver import Request, Response
from kimi_operator.router.keys import Scope, admit, authenticate, bearer
from kimi_operator.router.names import Target, resolve
from kimi_operator.router.routing import Replica, candidates, choose, may_retry

log = logging.getLogger("kimi_operator.router")

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    502: "server_error",
    503: "server_error",
}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | int | None = None
) -> tuple[bytes, str]:
    """OpenAI's error shape."""
    error = {
        "message": message,
        "type": _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
        "param": param,
        "code": code if code is not None else status,
    }
    return json.dumps({"error": error}).encode(), JSON


@dataclasses.dataclass(frozen=True)
class Call:
    """One generation request on its way: what is sent, and the labels its metrics carry."""

    path: str
    # The request as sent (before serialisation), the adapter it is for and the served name: a
    # llama.cpp engine is sent its own adapter ids, which differ from replica to replica.
    body: Mapping[str, Any]
    adapter: str | None
    served: str
    model: str
    key: str
    began: float
    stream: bool
    strip_usage: bool

    @functools.cached_property
    def payload(self) -> bytes:
        """``body`` serialised, once, for the engines sent it as it is (never for a llama-server)."""
        return _encode(self.body)


@dataclasses.dataclass(frozen=True)
class Whole:
    """An engine's whole (non-streamed) answer, or why there is none (``status`` None)."""

    status: int | None
    body: bytes = b""
    content_type: str = JSON
    # timeout: silent for --read-timeout; dropped: closed mid-answer; unreachable: no answer at all.
    failure: str | None = None
    error: str = ""


class Keys:
    """The keys as their mounted files say now, re-read on a short period (a rotated Secret takes
    effect without a restart)."""

    def __init__(self, root: Path, period: float = 1.0) -> None:
        self.root = root
        self.period = period
        self.table: dict[str, Scope] = {}
        self._problems: tuple[str, ...] = ()

    def refresh(self, config: RouterConfig) -> None:
        table, problems = read_keys(config, self.root)
        if tuple(problems) != self._problems:
            for p in problems:
                log.warning("%s", p)
            self._problems = tuple(problems)
        self.table = table


class Router:
    def __init__(
        self,
        fleet: Fleet,
        session: aiohttp.ClientSession,
        keys: Keys,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        read_timeout: float = 900.0,
    ) -> None:
        self.fleet = fleet
        self.session = session
        self.keys = keys
        self.config: RouterConfig | None = None
        self.rng = rng or random.Random()  # noqa: S311 (load spreading, not security)
        self.clock = clock
        self.timeout = upstream_timeout(read_timeout)
        # Whole answers still being fetched for clients that left (held so they are not collected).
        self._detached: set[asyncio.Task[Whole]] = set()
        # Set on SIGTERM: /ready answers 503 so the Service stops sending here before the port closes.
        self.draining = False
        self._routes: dict[str, tuple[str, Callable[[Request, Response], Awaitable[None]]]] = {
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._completions),
            "/v1/models": ("GET", self._models),
            "/health": ("GET", self._health),
            "/ready": ("GET", self._ready),
        }

    # -- configuration -------------------------------------------------------------------------

    def set_config(self, config: RouterConfig) -> None:
        if self.config is None or config.adapters != self.config.adapters or config.served != self.config.served:
            log.info("serving %s with adapters %s", config.served, sorted(config.adapters) or "none")
        self.config = config
        self.keys.refresh(config)

    def detached(self) -> set[asyncio.Task[Whole]]:
        """Whole answers still being fetched for clients that left."""
        return set(self._detached)

    # -- HTTP ----------------------------------------------------------------------------------

    def gate(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[int, bytes, str] | None:
        """Before a body is read: with keys configured, no key or a wrong one is refused at once, so
        a client without a key uploads nothing and learns nothing (not even the body limit)."""
        config = self.config
        if config is None or not config.keys or path not in _KEYED:
            return None
        status, _ = admit(headers.get("authorization"), self.keys.table, required=True)
        if status != 401:
            return None
        metrics.child(metrics.REQUESTS, "unknown", "invalid", "401").inc()
        body, content_type = error_body(401, "Incorrect API key provided", code="invalid_api_key")
        return 401, body, content_type

    async def handle(self, request: Request, response: Response) -> None:
        path = request.path
        route = self._routes.get(path)
        if route is None:
            return await self._error(response, 404, f"no route {path}", code="not_found")
        method, serve = route
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            return await self._error(response, 405, f"{request.method} is not allowed on {path}: use {method}")
        return await serve(request, response)

    async def _chat(self, request: Request, response: Response) -> None:
        await self._generate(request, response, chat=True)

    async def _completions(self, request: Request, response: Response) -> None:
        await self._generate(request, response, chat=False)

    async def _health(self, request: Request, response: Response) -> None:
        await response.send(200, b'{"status":"ok"}', JSON)

    async def _ready(self, request: Request, response: Response) -> None:
        """Ready while the router knows a ready replica: a Service sends nothing to one that does not."""
        ready = self.config is not None and not self.draining and self.fleet.any_ready()
        body = b'{"status":"ready"}' if ready else b'{"status":"no ready replica known"}'
        await response.send(200 if ready else 503, body, JSON)

    async def _error(
        self,
        response: Response,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        body, content_type = error_body(status, message, param=param, code=code)
        await response.send(status, body, content_type, headers or [])

    async def _models(self, request: Request, response: Response) -> None:
        config = self.config
        if config is None:
            return await self._error(response, 503, "the router has not read its LoraServer yet")
        served = self.fleet.served_adapters() & config.adapters
        visible: list[Target] = [Target(None), *(Target(a) for a in sorted(served))]
        if config.keys:
            scope = authenticate(bearer(request.header("authorization")), self.keys.table)
            if scope is None:
                return await self._error(response, 401, "Incorrect API key provided", code="invalid_api_key")
            visible = [t for t in visible if scope.allows(t)]
        cards = []
        for target in visible:
            card: dict[str, Any] = {
                "id": target.adapter or config.served,
                "object": "model",
                "created": 0,
                "owned_by": "kimi-operator",
            }
            if target.adapter is not None:
                card["parent"] = config.served
            cards.append(card)
        await response.send(200, json.dumps({"object": "list", "data": cards}).encode(), JSON)

    async def _generate(self, request: Request, response: Response, *, chat: bool) -> None:
        began = self.clock()
        config = self.config
        model_label, key_label = "unknown", "none"
        failed = False
        try:
            if config is None:
                await self._error(response, 503, "the router has not read its LoraServer yet", headers=_RETRY)
                return
            # The key first: a client without one learns nothing of the request's model.
            status, scope = admit(request.header("authorization"), self.keys.table, required=bool(config.keys))
            if status == 401:
                key_label = "invalid"
                await self._error(response, 401, "Incorrect API key provided", code="invalid_api_key")
                return
            key_label = scope.key_id if scope else "none"
            try:
                body = requests.check(_json(request.body), chat=chat)
            except requests.Invalid as exc:
                await self._error(response, 400, exc.message, param=exc.param)
                return
            except (ValueError, RecursionError) as exc:
                await self._error(response, 400, f"the request body is not valid JSON: {str(exc)[:200]}")
                return
            target = resolve(body["model"], served=config.served, adapters=config.adapters)
            if target is None:
                message = f"The model `{str(body['model'])[:200]}` does not exist or you do not have access to it."
                await self._error(response, 404, message, param="model", code="model_not_found")
                return
            model_label = target.adapter or config.served
            if scope is not None and not scope.allows(target):
                message = f"key {key_label} may not use the model `{model_label}`"
                await self._error(response, 403, message, param="model", code="model_not_allowed")
                return
            await self._forward(response, body, target, config, model=model_label, key=key_label, began=began)
        except asyncio.CancelledError:
            raise  # the client went away: counted as 499 below
        except Exception:
            failed = True  # the server answers 500 once this returns
            raise
        finally:
            code = response.status or (500 if failed else 499)
            metrics.child(metrics.REQUESTS, model_label, key_label, str(code)).inc()
            metrics.child(metrics.LATENCY, model_label).observe(self.clock() - began)

    async def _forward(
        self,
        response: Response,
        body: Mapping[str, Any],
        target: Target,
        config: RouterConfig,
        *,
        model: str,
        key: str,
        began: float,
    ) -> None:
        upstream = merged(body, config.defaults)
        upstream["model"] = target.upstream(config.served)
        stream = bool(upstream.get("stream"))
        strip_usage = False
        if stream:
            options = dict(upstream.get("stream_options") or {})
            # The engine is asked for usage (the token metrics need it); the client sees it only if it asked.
            strip_usage = not options.get("include_usage")
            upstream["stream_options"] = {**options, "include_usage": True}
        call = Call(
            path="/v1/chat/completions" if "messages" in body else "/v1/completions",
            body=upstream,
            adapter=target.adapter,
            served=config.served,
            model=model,
            key=key,
            began=began,
            stream=stream,
            strip_usage=strip_usage,
        )
        tried: set[str] = set()
        in_flight = metrics.child(metrics.IN_FLIGHT, model)
        in_flight.inc()
        try:
            while True:
                replica = choose(candidates(target, self.fleet.replicas()), self.rng, exclude=frozenset(tried))
                if replica is None:
                    if tried:
                        message = f"every replica holding `{model}` failed; tried {', '.join(sorted(tried))}"
                    else:
                        message = config.why_unavailable(target.adapter)
                    await self._error(response, 503, message, code="no_replica", headers=_RETRY)
                    return
                if tried:
                    metrics.child(metrics.RETRIES, model).inc()
                tried.add(replica.name)
                if await self._attempt(response, replica, call):
                    return
        finally:
            in_flight.dec()

    async def _post(self, replica: Replica, call: Call, data: bytes) -> aiohttp.ClientResponse:
        """The engine's answer head. A pooled connection that the engine closed while it was idle
        fails before any byte went out: that is tried once more, on a fresh connection, before the
        replica counts as unreachable."""
        url = f"{replica.url}{call.path}"
        try:
            return await self.session.post(url, data=data, headers=_UPSTREAM_HEADERS, timeout=self.timeout)
        except aiohttp.ServerDisconnectedError:
            return await self.session.post(url, data=data, headers=_UPSTREAM_HEADERS, timeout=self.timeout)

    def _payload(self, engine: Engine | None, call: Call) -> bytes | None:
        """What the engine is sent; None when it no longer has the adapter. llama-server: its model
        name, every adapter id it has (the chosen one at scale 1, the others at 0: a request without
        a list runs them all at their start scale; an id it does not have would be ignored without a
        word) and no prompt cache: its caches restore a prefix computed under another adapter."""
        if self.fleet.api != "llamacpp":
            return call.payload
        if engine is None:
            return None
        chosen = None
        if call.adapter is not None:
            chosen = engine.lora_ids.get(call.adapter)
            if chosen is None:
                return None
        lora = [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in engine.all_ids]
        return _encode({**call.body, "model": call.served, "lora": lora, "cache_prompt": False})

    async def _attempt(self, response: Response, replica: Replica, call: Call) -> bool:
        """One try on one replica. False: nothing reached the client and another may take it."""
        engine = self.fleet.engines.get(replica.name)
        data = self._payload(engine, call)
        if data is None:
            # The engine no longer has the adapter it listed (a llama-server restarted with other
            # adapters): not sent, for it would answer as the base model without a word.
            self.fleet.wake()
            return False
        if engine is not None:
            # Counted now, before any await: requests arriving meanwhile choose on current counts.
            engine.in_flight += 1
        if call.stream:
            return await self._attempt_stream(response, replica, call, data, engine)
        whole_fetch = self._whole(replica, call, data, engine)
        if self.fleet.api != "sglang":
            whole = await whole_fetch
        else:
            # A whole (non-streamed) answer is fetched by a task of its own that a client leaving
            # does not cancel: SGLang 0.5.16 never releases an adapter's in-flight count when such
            # a request is aborted, and that adapter can then never be unloaded (seen on a real
            # engine, e2e/gpu/serve/RESULTS.md). An aborted stream releases it: streams are cancelled.
            task = asyncio.ensure_future(whole_fetch)
            self._detached.add(task)
            task.add_done_callback(self._detached.discard)
            task.add_done_callback(_finished)
            whole = await asyncio.shield(task)
        if whole.status is None:
            return await self._unanswered(response, replica, whole)
        if whole.status != 200:
            return await self._refusal(response, replica, whole.status, whole.body, whole.content_type)
        metrics.child(metrics.FIRST_TOKEN, call.model).observe(self.clock() - call.began)
        _count_usage(whole.body, call.model, call.key)
        await response.send(200, whole.body, whole.content_type)
        return True

    async def _whole(self, replica: Replica, call: Call, data: bytes, engine: Engine | None) -> Whole:
        """The engine's whole answer (``engine``'s in-flight count, taken by the caller, is given back)."""
        try:
            resp = await self._post(replica, call, data)
            async with resp:
                metrics.child(metrics.UPSTREAM, replica.name, call.model, str(resp.status)).inc()
                return Whole(resp.status, await _read(resp), resp.headers.get("Content-Type", JSON))
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._no_answer(replica, call, exc)
        finally:
            if engine is not None:
                engine.in_flight -= 1

    def _no_answer(self, replica: Replica, call: Call, exc: Exception) -> Whole:
        """What an attempt that got no whole answer failed of (a dropped answer was counted with its
        status already)."""
        if isinstance(exc, _Dropped):
            return Whole(None, failure="dropped", error=str(exc))
        metrics.child(metrics.UPSTREAM, replica.name, call.model, "0").inc()
        if isinstance(exc, aiohttp.SocketTimeoutError):
            # Connected, but silent for --read-timeout: stuck (or a prefill longer than allowed).
            # The request may be running there: it is not sent elsewhere.
            self.fleet.wake()
            return Whole(None, failure="timeout")
        return Whole(None, failure="unreachable", error=str(exc) or type(exc).__name__)

    async def _unanswered(self, response: Response, replica: Replica, whole: Whole) -> bool:
        """An attempt without an answer (``whole.status`` None): a 504, or (False) left for another replica."""
        if whole.failure == "timeout":
            message = f"the engine replica {replica.name} gave no answer in {self.timeout.sock_read:.0f} s"
            await self._error(response, 504, message, code="engine_timeout")
            return True
        self.fleet.unreachable(replica.name, whole.error)
        # Unreachable, or closed before the whole answer came: nothing reached the client yet.
        return not may_retry(connected=False, status=None, sent_to_client=False)

    async def _refusal(self, response: Response, replica: Replica, status: int, raw: bytes, content_type: str) -> bool:
        """An engine's answer other than 200: passed on, or (False) left for another replica."""
        not_here = status == 400 and any(words in raw for words in NOT_HERE)
        if not_here or status == 503:
            # The engine lost the adapter since it listed it, or is busy: ask it again now.
            self.fleet.wake()
        if may_retry(connected=True, status=status, sent_to_client=False, not_here=not_here):
            return False
        await response.send(status, raw, content_type)
        return True

    async def _attempt_stream(
        self, response: Response, replica: Replica, call: Call, data: bytes, engine: Engine | None
    ) -> bool:
        try:
            try:
                resp = await self._post(replica, call, data)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return await self._unanswered(response, replica, self._no_answer(replica, call, exc))
            try:
                async with resp:
                    metrics.child(metrics.UPSTREAM, replica.name, call.model, str(resp.status)).inc()
                    content_type = resp.headers.get("Content-Type", JSON)
                    if resp.status != 200:
                        return await self._refusal(response, replica, resp.status, await _read(resp), content_type)
                    if resp.content_type != "text/event-stream":
                        raw = await _read(resp)
                        _count_usage(raw, call.model, call.key)
                        await response.send(200, raw, content_type)
                        return True
                    await self._relay_stream(response, resp, replica, call)
                    return True
            except _Dropped as exc:
                # Closed before the whole answer came, and nothing of it reached the client yet.
                return await self._unanswered(response, replica, self._no_answer(replica, call, exc))
        finally:
            if engine is not None:
                engine.in_flight -= 1

    async def _relay_stream(
        self, response: Response, resp: aiohttp.ClientResponse, replica: Replica, call: Call
    ) -> None:
        await response.start_stream(200, SSE)
        pending = b""
        first = True
        # The usage of the usage-only event (SGLang, llama-server's chat), else of the last event
        # carrying one (llama-server's completions put it beside the final choice).
        usage: Any = None
        usage_only = False
        try:
            async for data in resp.content.iter_any():
                pending += data
                # Whole events only, each as soon as it is whole (SSE ends an event with a blank
                # line: \n\n, \r\n\r\n or \r\r). The events one read brought are sent together,
                # each its own chunk, in one write.
                events: list[bytes] = []
                start = 0
                for found in _EVENT_END.finditer(pending):
                    event, start = pending[start : found.end()], found.end()
                    if b'"usage"' in event:
                        found_usage, only = _usage_of(event)
                        if found_usage is not None and not usage_only:
                            usage, usage_only = found_usage, only
                        if only and call.strip_usage:
                            continue
                    events.append(event)
                if start:
                    pending = pending[start:]
                if events:
                    if first:
                        metrics.child(metrics.FIRST_TOKEN, call.model).observe(self.clock() - call.began)
                        first = False
                    await response.write_many(events)
            if pending.strip():
                await response.write(pending)
            _add_usage(usage, call.model, call.key)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The engine went away or went silent mid-stream: the client gets an error event and the
            # end, not a hang.
            if isinstance(exc, aiohttp.SocketTimeoutError):
                self.fleet.wake()
                message = f"the engine replica {replica.name} sent nothing for {self.timeout.sock_read:.0f} s"
            else:
                self.fleet.unreachable(replica.name, str(exc) or type(exc).__name__)
                message = f"the engine replica {replica.name} stopped in the middle of the answer"
            error = {"error": {"message": message, "type": "server_error", "param": None, "code": 502}}
            await response.write(b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n")


_RETRY = [("Retry-After", "5")]
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# SGLang's words when a request names an adapter the engine does not hold (REFERENCE.md), and when
# it was evicted between the listing and the request.
NOT_HERE = (b"never been loaded", b"are not loaded")
# The engine's answer is relayed as it is: never compressed on the way.
_UPSTREAM_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
# The paths a key is needed for (the probes are not).
_KEYED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})


def _finished(task: asyncio.Task[Whole]) -> None:
    """A detached fetch ended: forget it, and never leave its failure unread (and unlogged)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("fetching a whole answer failed", exc_info=task.exception())


def upstream_timeout(read_seconds: float) -> aiohttp.ClientTimeout:
    """Connecting is quick or the replica is down; between two bytes of an answer (or before its
    head: a prefill) at most ``read_seconds``, or the engine counts as stuck."""
    return aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=read_seconds)


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.read()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise _Dropped(str(exc)) from exc


class _Dropped(aiohttp.ClientConnectionError):
    """The engine closed the connection before the whole answer arrived."""


def _encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _json(raw: bytes) -> Any:
    """A body as JSON: strict UTF-8 (no lone surrogate bytes; a \\ud800 escape is JSON's own and
    passes), RFC 8259 numbers (no NaN or Infinity)."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def _count_usage(raw: bytes, model: str, key: str) -> None:
    try:
        usage = json.loads(raw).get("usage") or {}
    except (ValueError, AttributeError):
        return
    _add_usage(usage, model, key)


def _add_usage(usage: Any, model: str, key: str) -> None:
    if not isinstance(usage, dict):
        return
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and prompt > 0:
        metrics.child(metrics.PROMPT_TOKENS, model, key).inc(prompt)
    if isinstance(completion, int) and completion > 0:
        metrics.child(metrics.COMPLETION_TOKENS, model, key).inc(completion)


def _usage_of(event: bytes) -> tuple[Any, bool]:
    """An event's usage (None: none), and whether it is the usage-only event (no choices). Running
    totals on other events (continuous usage) are superseded by the usage-only event's."""
    text = event.strip()
    if not text.startswith(b"data:"):
        return None, False
    try:
        data = json.loads(text[5:])
    except ValueError:
        return None, False
    if not isinstance(data, dict) or not data.get("usage"):
        return None, False
    return data["usage"], data.get("choices") == []
