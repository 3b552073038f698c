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
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

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
    # After an error answer, how long what the client still sends is read and dropped before the
    # connection closes (see Server._fail).
    linger_seconds: float = 5.0


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

    def __init__(
        self, writer: asyncio.StreamWriter, keep_alive: bool, *, head_only: bool = False, chunked: bool = True
    ) -> None:
        self._writer = writer
        self.keep_alive = keep_alive
        # HEAD: the head of the answer GET would give, without its body.
        self.head_only = head_only
        # An HTTP/1.0 client knows no chunks: a stream is its bytes, ended by closing.
        self.chunked = chunked
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
        self._writer.write(head if self.head_only else head + body)
        await self._writer.drain()

    async def start_stream(self, status: int, content_type: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        assert not self.started, "an answer was already started"
        self.status, self.started, self.streaming = status, True, True
        if not self.chunked:
            self.keep_alive = False
        framing = [("Transfer-Encoding", "chunked")] if self.chunked else []
        all_headers = [("Content-Type", content_type), *framing, ("Cache-Control", "no-cache")]
        self._writer.write(self._head(status, [*all_headers, *headers]))
        await self._writer.drain()

    async def write(self, data: bytes) -> None:
        """One chunk, sent at once (an event of a stream is never held back)."""
        if data and not self.head_only:
            self._writer.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
            await self._writer.drain()

    async def write_many(self, parts: Sequence[bytes]) -> None:
        """Several chunks, each framed as :meth:`write` frames it, sent at once in one write (the
        bytes on the wire are those of one :meth:`write` per part)."""
        if len(parts) == 1:
            return await self.write(parts[0])
        if self.head_only:
            return
        if self.chunked:
            data = b"".join([b"%x\r\n%s\r\n" % (len(part), part) for part in parts if part])
        else:
            data = b"".join(parts)
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def end(self) -> None:
        if self.streaming and not self.finished:
            self.finished = True
            if self.chunked and not self.head_only:
                self._writer.write(b"0\r\n\r\n")
                await self._writer.drain()


Handler = Callable[[Request, Response], Awaitable[None]]
# Answers a request that could not be read (status, message) in the application's error shape.
ErrorBody = Callable[[int, str], tuple[bytes, str]]
# Looks at a request's head before its body is read: None to go on, or the whole answer (status,
# body, content type), given before any byte of the body is read (a wrong key uploads nothing).
Gate = Callable[[str, str, Mapping[str, str]], tuple[int, bytes, str] | None]


class Refused(Exception):
    """A gate's answer to a request whose body was not read: sent, then the connection closed."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


class _Reader:
    """A StreamReader with a pushback buffer: bytes a disconnect watcher read early belong to the
    next request."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()

    def push(self, data: bytes) -> None:
        self._buffer.extend(data)

    def take_until(self, separator: bytes, limit: int, too_long: tuple[int, str] | None = None) -> bytes | None:
        """What :meth:`readuntil` returns when the buffer holds it already, else None (nothing read)."""
        index = self._buffer.find(separator)
        # A read may bring far more than the limit at once: the separator found in it does not
        # make an over-long head acceptable.
        if index > limit or (index < 0 and len(self._buffer) > limit):
            status, message = too_long or (431, f"request headers exceed {limit} bytes")
            raise HttpError(status, message)
        if index < 0:
            return None
        out = bytes(self._buffer[: index + len(separator)])
        del self._buffer[: index + len(separator)]
        return out

    async def readuntil(self, separator: bytes, limit: int, too_long: tuple[int, str] | None = None) -> bytes:
        """Up to and with ``separator``; ``too_long`` (status, message) when more than ``limit`` bytes
        come before it (default: a 431 for request headers)."""
        while (out := self.take_until(separator, limit, too_long)) is None:
            data = await self._reader.read(65536)
            if not data:
                raise EOFError(bytes(self._buffer))
            self._buffer.extend(data)
        return out

    def take_exactly(self, size: int) -> bytes | None:
        """What :meth:`readexactly` returns when the buffer holds it already, else None (nothing read)."""
        if len(self._buffer) < size:
            return None
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    async def readexactly(self, size: int) -> bytes:
        while (out := self.take_exactly(size)) is None:
            data = await self._reader.read(max(65536, size - len(self._buffer)))
            if not data:
                raise HttpError(400, "the connection closed before the whole body arrived")
            self._buffer.extend(data)
        return out

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    async def read_some(self) -> bytes:
        return await self._reader.read(65536)


# RFC 9110 token characters: a header name of anything else is malformed.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Control characters other than a tab may not appear in a header value (RFC 9110 section 5.5: CR,
# LF and NUL must be refused; the others have no meaning there either).
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(r"[0-9A-Fa-f]+")


def _exceeds(digits: str, limit: int, base: int) -> bool:
    """Whether a number written with ``digits`` (already checked) is above ``limit``, without
    converting a number of thousands of digits (int() refuses more than 4300 decimal digits, and a
    number that long exceeds any limit anyway)."""
    significant = digits.lstrip("0")
    return len(significant) > 20 or int(significant or "0", base) > limit


def _parse_head(raw: bytes) -> tuple[str, str, str, dict[str, str]]:
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
        # A 400, not RFC 9110's 505: a 5xx says the server failed, and the router's 5xx are what its
        # alerts and its clients' retries count; a client speaking another protocol (an HTTP/2
        # preface sent without negotiation) did not make the router fail.
        raise HttpError(400, f"{version[:20]} is not served (HTTP/1.1 and HTTP/1.0 are)")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, f"malformed header line: {line[:100]!r}")
        key = name.lower()
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, f"header {name[:100]} has a control character in its value")
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
        line = await reader.readuntil(b"\r\n", 1024, (400, "malformed chunk size line"))
        # Hex digits only: int(..., 16) would also take "0x10", "+10" and "1_0", which no other
        # parser on the way reads the same.
        text = line[:-2].split(b";", 1)[0].strip(b" \t").decode("latin-1")
        if not _HEX.fullmatch(text):
            raise HttpError(400, "malformed chunk size")
        if _exceeds(text, limits.body_bytes - len(body), 16):
            raise HttpError(413, f"request body exceeds {limits.body_bytes} bytes")
        size = int(text, 16)
        if size == 0:
            # Trailers, then the blank line.
            too_long = (431, f"a trailer exceeds {limits.header_bytes} bytes")
            while (await reader.readuntil(b"\r\n", limits.header_bytes, too_long)) != b"\r\n":
                pass
            return bytes(body)
        body.extend(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "malformed chunk")


async def _read_request(
    reader: _Reader, limits: Limits, peer: str, writer: asyncio.StreamWriter, gate: Gate | None = None
) -> Request:
    # What is in the buffer already (a request's first read most often brings all of it) is taken
    # without a timed wait: the wait, a task and a timer, is only for what is still to come.
    raw = reader.take_until(b"\r\n\r\n", limits.header_bytes)
    if raw is None:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n", limits.header_bytes), limits.header_seconds)
    method, target, version, headers = _parse_head(raw[:-4])
    if gate is not None and (answer := gate(method, target.split("?", 1)[0], headers)) is not None:
        raise Refused(*answer)
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise HttpError(400, "both Content-Length and Transfer-Encoding given")
        if headers["transfer-encoding"].lower() != "chunked":
            # A 400, not RFC 9112's 501, for the reason a foreign version gets one (see _parse_head).
            raise HttpError(400, f"Transfer-Encoding {headers['transfer-encoding'][:40]} is not supported")
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await asyncio.wait_for(_read_chunked(reader, limits), limits.body_seconds)
        return Request(method, target, version, headers, body, peer)
    length_text = headers.get("content-length", "0")
    # ASCII digits only: str.isdigit() also takes "²" and other digits int() refuses.
    if not _DIGITS.fullmatch(length_text):
        raise HttpError(400, f"malformed Content-Length {length_text[:40]!r}")
    if _exceeds(length_text, limits.body_bytes, 10):
        raise HttpError(413, f"request body of {length_text[:40]} bytes exceeds the limit of {limits.body_bytes}")
    length = int(length_text)
    if length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    buffered = reader.take_exactly(length) if length else b""
    if buffered is None:
        buffered = await asyncio.wait_for(reader.readexactly(length), limits.body_seconds)
    return Request(method, target, version, headers, buffered, peer)


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


class Server:
    def __init__(
        self, handler: Handler, error_body: ErrorBody, limits: Limits | None = None, gate: Gate | None = None
    ) -> None:
        self.gate = gate
        self.handler = handler
        self.error_body = error_body
        self.limits = limits or Limits()
        self._connections: set[asyncio.Task[None]] = set()
        # Connections waiting for their next request, closed at once when draining starts.
        self._idle: set[asyncio.Task[Any]] = set()
        self._active = 0
        self.draining = False

    def busy(self) -> bool:
        """Whether a request is being answered."""
        return self._active > 0

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._connection, host, port, backlog=4096, limit=self.limits.header_bytes)

    async def _fail(
        self,
        stream: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
        answer: tuple[bytes, str] | None = None,
    ) -> None:
        body, content_type = answer or self.error_body(status, message)
        response = Response(writer, keep_alive=False)
        # OSError, not only ConnectionError: ending this side of a connection the client already
        # reset raises ENOTCONN.
        with contextlib.suppress(OSError, RuntimeError):
            await response.send(status, body, content_type)
            # Closing a socket whose input was not all read makes the kernel send a reset, and a
            # client still sending (a body over the limit) then sees "connection reset" instead of
            # the 413. So: end this side (the client reads the answer to its end), and read and drop
            # what it still sends until it closes, for a bounded time, before closing.
            if writer.can_write_eof():
                writer.write_eof()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_discard(stream), self.limits.linger_seconds)

    async def _connection(self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer_info = writer.get_extra_info("peername")
        peer = f"{peer_info[0]}:{peer_info[1]}" if isinstance(peer_info, tuple) else "?"
        reader = _Reader(stream)
        try:
            while (request := await self._next_request(stream, reader, writer, peer)) is not None:
                tokens = {t.strip().lower() for t in (request.header("connection") or "").split(",")}
                keep_alive = request.version == "HTTP/1.1" and "close" not in tokens and not self.draining
                response = Response(
                    writer, keep_alive, head_only=request.method == "HEAD", chunked=request.version == "HTTP/1.1"
                )
                if not await self._handle(reader, request, response) or not response.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Closed by the server (an idle connection while draining, or the grace period over).
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
                # Waiting for the next request of a keep-alive connection: an idle one just closes
                # (and at once when the server drains).
                if self.draining:
                    return None
                task = asyncio.current_task()
                assert task is not None
                self._idle.add(task)
                try:
                    # A timeout scope, not wait_for: no task of its own for each request's first read.
                    async with asyncio.timeout(self.limits.idle_seconds):
                        first = await stream.read(65536)
                except TimeoutError:
                    return None
                finally:
                    self._idle.discard(task)
                if not first:
                    return None
                reader.push(first)
            return await _read_request(reader, self.limits, peer, writer, self.gate)
        except EOFError as exc:
            if exc.args and exc.args[0]:
                await self._fail(stream, writer, 400, "the connection closed in the middle of the request")
        except TimeoutError:
            await self._fail(stream, writer, 408, "the request did not arrive in time")
        except HttpError as exc:
            await self._fail(stream, writer, exc.status, exc.message)
        except Refused as exc:
            await self._fail(stream, writer, exc.status, "", answer=(exc.body, exc.content_type))
        except ConnectionError:
            raise
        except Exception:
            # A request this reader did not foresee: answered and logged, never a dropped connection.
            log.exception("reading a request from %s failed", peer)
            await self._fail(stream, writer, 500, "internal error")
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
            while True:
                done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
                if work in done:
                    break
                data = watch.result() if not watch.cancelled() and watch.exception() is None else b""
                if not data:
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await work
                    return False
                # Bytes of a pipelined next request (or a stray CRLF): kept for later, and the
                # client is still watched, for it may go away after sending them.
                reader.push(data)
                watch = asyncio.ensure_future(reader.read_some())
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

    def drain(self) -> None:
        """No more keep-alive: every answer from now on closes its connection, idle ones close now."""
        self.draining = True
        for task in list(self._idle):
            task.cancel()

    async def close(self) -> None:
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
