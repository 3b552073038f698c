"""A small HTTP/1.1 server on asyncio streams, for the router's client side.

Why not a framework: the router must answer every malformed request with OpenAI's error shape
(a framework answers bad HTTP in its own words), bound how long headers and bodies may take to
arrive (slow-header clients hold connections otherwise; aiohttp's server has no such bound), and
notice a client that goes away while the engine is still working, to cancel the engine's request.
It serves one request at a time per connection (keep-alive, no pipelining of answers), bodies by
Content-Length or chunked, and answers by Content-Length or, for streams, chunked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("kimi_operator.router.http")

REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@dataclasses.dataclass(frozen=True)
class Limits:
    header_bytes: int = 32 * 1024
    body_bytes: int = 16 * 1024 * 1024
    # From the first byte of a request to the end of its headers.
    header_seconds: float = 10.0
    body_seconds: float = 60.0
    # An idle keep-alive connection is closed after this long.
    idle_seconds: float = 75.0


class HttpError(Exception):
    """A request that cannot be read: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes
    peer: str

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Response:
    """What a handler writes to: one whole answer, or a stream of chunks."""

    def __init__(self, writer: asyncio.StreamWriter, keep_alive: bool) -> None:
        self._writer = writer
        self.keep_alive = keep_alive
        self.status: int | None = None
        self.streaming = False
        self.finished = False
        # Whether any byte of the answer left: after that, a failure can only end the stream.
        self.started = False

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        lines.extend(f"{k}: {v}" for k, v in headers)
        if not self.keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, status: int, body: bytes, content_type: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        assert not self.started, "an answer was already started"
        self.status, self.started, self.finished = status, True, True
        head = self._head(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
        self._writer.write(head + body)
        await self._writer.drain()

    async def start_stream(self, status: int, content_type: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        assert not self.started, "an answer was already started"
        self.status, self.started, self.streaming = status, True, True
        all_headers = [("Content-Type", content_type), ("Transfer-Encoding", "chunked"), ("Cache-Control", "no-cache")]
        self._writer.write(self._head(status, [*all_headers, *headers]))
        await self._writer.drain()

    async def write(self, data: bytes) -> None:
        """One chunk, sent at once (an event of a stream is never held back)."""
        if data:
            self._writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self._writer.drain()

    async def end(self) -> None:
        if self.streaming and not self.finished:
            self.finished = True
            self._writer.write(b"0\r\n\r\n")
            await self._writer.drain()


Handler = Callable[[Request, Response], Awaitable[None]]
# Answers a request that could not be read (status, message) in the application's error shape.
ErrorBody = Callable[[int, str], tuple[bytes, str]]


class _Reader:
    """A StreamReader with a pushback buffer: bytes a disconnect watcher read early belong to the
    next request."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()

    def push(self, data: bytes) -> None:
        self._buffer.extend(data)

    async def readuntil(self, separator: bytes, limit: int) -> bytes:
        while True:
            index = self._buffer.find(separator)
            if index >= 0:
                out = bytes(self._buffer[: index + len(separator)])
                del self._buffer[: index + len(separator)]
                return out
            if len(self._buffer) > limit:
                raise HttpError(431, f"request headers exceed {limit} bytes")
            data = await self._reader.read(65536)
            if not data:
                raise EOFError(bytes(self._buffer))
            self._buffer.extend(data)

    async def readexactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = await self._reader.read(max(65536, size - len(self._buffer)))
            if not data:
                raise HttpError(400, "the connection closed before the whole body arrived")
            self._buffer.extend(data)
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    async def read_some(self) -> bytes:
        return await self._reader.read(65536)


def _parse_head(raw: bytes, limits: Limits) -> tuple[str, str, str, dict[str, str]]:
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes any byte
        raise HttpError(400, "request head is not text") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1] or not parts[2].startswith("HTTP/"):
        raise HttpError(400, f"malformed request line: {lines[0][:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"{version[:20]} is not served (HTTP/1.1 and HTTP/1.0 are)")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or any(c in name for c in ' \t()<>@,;\\"/[]?={}'):
            raise HttpError(400, f"malformed header line: {line[:100]!r}")
        key = name.lower()
        value = value.strip()
        if key in headers:
            if key in ("content-length", "transfer-encoding", "host", "authorization"):
                raise HttpError(400, f"header {name} given twice")
            headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value
    if len(headers) > 100:
        raise HttpError(431, "too many request headers")
    return method.upper(), target, version, headers


async def _read_chunked(reader: _Reader, limits: Limits) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n", 1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise HttpError(400, "malformed chunk size") from exc
        if size < 0:
            raise HttpError(400, "malformed chunk size")
        if size == 0:
            # Trailers, then the blank line.
            while (await reader.readuntil(b"\r\n", limits.header_bytes)) != b"\r\n":
                pass
            return bytes(body)
        if len(body) + size > limits.body_bytes:
            raise HttpError(413, f"request body exceeds {limits.body_bytes} bytes")
        body.extend(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "malformed chunk")


async def _read_request(reader: _Reader, limits: Limits, peer: str, writer: asyncio.StreamWriter) -> Request:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n", limits.header_bytes), limits.header_seconds)
    method, target, version, headers = _parse_head(raw[:-4], limits)
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise HttpError(400, "both Content-Length and Transfer-Encoding given")
        if headers["transfer-encoding"].lower() != "chunked":
            raise HttpError(501, f"Transfer-Encoding {headers['transfer-encoding'][:40]} is not supported")
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await asyncio.wait_for(_read_chunked(reader, limits), limits.body_seconds)
        return Request(method, target, version, headers, body, peer)
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise HttpError(400, f"malformed Content-Length {length_text[:40]!r}")
    length = int(length_text)
    if length > limits.body_bytes:
        raise HttpError(413, f"request body of {length} bytes exceeds the limit of {limits.body_bytes}")
    if length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await asyncio.wait_for(reader.readexactly(length), limits.body_seconds) if length else b""
    return Request(method, target, version, headers, body, peer)


class Server:
    def __init__(self, handler: Handler, error_body: ErrorBody, limits: Limits | None = None) -> None:
        self.handler = handler
        self.error_body = error_body
        self.limits = limits or Limits()
        self._connections: set[asyncio.Task[None]] = set()
        self._active = 0

    def busy(self) -> bool:
        """Whether a request is being answered."""
        return self._active > 0

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._connection, host, port, backlog=4096, limit=self.limits.header_bytes)

    async def _fail(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        body, content_type = self.error_body(status, message)
        response = Response(writer, keep_alive=False)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.send(status, body, content_type)

    async def _connection(self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer_info = writer.get_extra_info("peername")
        peer = f"{peer_info[0]}:{peer_info[1]}" if isinstance(peer_info, tuple) else "?"
        reader = _Reader(stream)
        try:
            while (request := await self._next_request(stream, reader, writer, peer)) is not None:
                keep_alive = request.version == "HTTP/1.1" and request.header("connection") != "close"
                response = Response(writer, keep_alive)
                if not await self._handle(reader, request, response) or not response.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _next_request(
        self, stream: asyncio.StreamReader, reader: _Reader, writer: asyncio.StreamWriter, peer: str
    ) -> Request | None:
        """The connection's next request; None when it is done (closed, or answered with an error)."""
        try:
            if not reader.pending:
                # Waiting for the next request of a keep-alive connection: an idle one just closes.
                try:
                    first = await asyncio.wait_for(stream.read(65536), self.limits.idle_seconds)
                except TimeoutError:
                    return None
                if not first:
                    return None
                reader.push(first)
            return await _read_request(reader, self.limits, peer, writer)
        except EOFError as exc:
            if exc.args and exc.args[0]:
                await self._fail(writer, 400, "the connection closed in the middle of the request head")
        except TimeoutError:
            await self._fail(writer, 408, "the request did not arrive in time")
        except HttpError as exc:
            await self._fail(writer, exc.status, exc.message)
        return None

    async def _handle(self, reader: _Reader, request: Request, response: Response) -> bool:
        """Run the handler while watching the client: a client that closes its side cancels the
        handler (and with it the engine's request). False: the connection is done."""
        self._active += 1
        try:
            return await self._watched(reader, request, response)
        finally:
            self._active -= 1

    async def _watched(self, reader: _Reader, request: Request, response: Response) -> bool:
        work = asyncio.ensure_future(self.handler(request, response))
        watch = asyncio.ensure_future(reader.read_some())
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done and work not in done:
                data = watch.result() if not watch.cancelled() and watch.exception() is None else b""
                if not data:
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await work
                    return False
                # A pipelined next request: keep its bytes, finish this one first.
                reader.push(data)
                await work
            else:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    data = await watch
                    if data:
                        reader.push(data)
            if work.exception() is not None:
                raise work.exception()  # type: ignore[misc]
            if not response.started:
                await self._fail_response(response, 500, "the handler gave no answer")
                return False
            await response.end()
            return True
        except (ConnectionError, asyncio.CancelledError):
            work.cancel()
            watch.cancel()
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            if not response.started:
                await self._fail_response(response, 500, "internal error")
            return False

    async def _fail_response(self, response: Response, status: int, message: str) -> None:
        body, content_type = self.error_body(status, message)
        response.keep_alive = False
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.send(status, body, content_type)

    async def close(self) -> None:
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
