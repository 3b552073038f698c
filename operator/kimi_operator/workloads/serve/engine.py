"""The engines' APIs as the agent uses them, over plain HTTP: SGLang's adapter API (REFERENCE.md,
"SGLang multi-LoRA"), and llama.cpp's ``llama-server``, whose adapters are fixed at its start and
only listed.

Only the answers are interpreted here; what to load and unload is decided in ``sync``, which
planned adapter a llama-server's file is in ``llamacpp``.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import urllib.error
import urllib.request
from typing import Any

# Loading reads the adapter into the LoRA pool; unloading waits for the adapter's requests in
# flight, which can be long generations: neither is a sign of a dead engine.
LIST_TIMEOUT = 10.0
CHANGE_TIMEOUT = 600.0
# An unload reads no files, but waits for the adapter's requests in flight. One still waiting after
# this long while the engine runs no request at all waits for nothing: SGLang 0.5.16 never releases
# an adapter whose non-streamed request was aborted, and its unload then waits for good, holding the
# lock every later load and unload needs (RESULTS.md).
UNLOAD_TIMEOUT = 60.0
_RUNNING = re.compile(r"^sglang:num_running_reqs(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


class EngineDown(Exception):
    """The engine did not answer its listing (starting, restarting, or gone)."""


@dataclasses.dataclass(frozen=True)
class Answer:
    ok: bool
    message: str
    # True when the engine judged these files and said no (HTTP 400): sending them again will not
    # help. Anything else (starting, 5xx) may succeed on a later try.
    refused: bool = False
    # The engine took the request and gave no answer in time: the change may still be pending there,
    # and every later one waits behind it.
    timed_out: bool = False
    # Timed out while the engine generates nothing: waiting for nothing, its adapter updates are stuck.
    stuck: bool = False


def _call(url: str, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, Any]:
    """(HTTP status, JSON body) of one request; an error's body that is not JSON comes back as its text."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 (the engine beside us, at the http URL we were given)
        url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, {"error_message": raw.decode(errors="replace")}


class Engine:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, Any]:
        return _call(self.url, method, path, body, timeout)

    def models(self, served: str) -> dict[str, str]:
        """Adapter name -> the path it was loaded from, as /v1/models lists them (the base excluded)."""
        try:
            code, body = self._call("GET", "/v1/models", None, LIST_TIMEOUT)
        except (OSError, ValueError) as exc:
            raise EngineDown(f"{self.url}/v1/models: {exc}") from exc
        if code != 200 or not isinstance(body, dict):
            raise EngineDown(f"/v1/models answered {code}")
        cards = body.get("data") or []
        # The base model's card has no parent; each adapter's names the base as its parent.
        return {str(c["id"]): str(c.get("root") or "") for c in cards if c.get("id") != served and c.get("parent")}

    def _change(self, path: str, body: dict[str, Any], timeout: float = CHANGE_TIMEOUT) -> Answer:
        try:
            code, answer = self._call("POST", path, body, timeout)
        except TimeoutError:
            return self._timed_out(f"{path} gave no answer in {timeout:.0f} s")
        except (OSError, ValueError) as exc:
            return Answer(False, f"{path}: {exc}")
        if not isinstance(answer, dict):
            return Answer(False, f"HTTP {code}")
        ok = code == 200 and bool(answer.get("success"))
        message = str(answer.get("error_message") or answer.get("message") or ("" if ok else f"HTTP {code}"))
        return Answer(ok, message, refused=not ok and code == 400)

    def load(self, name: str, path: str, *, pinned: bool = False) -> Answer:
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if pinned:
            body["pinned"] = True
        return self._change("/load_lora_adapter", body)

    def unload(self, name: str) -> Answer:
        return self._change("/unload_lora_adapter", {"lora_name": name}, UNLOAD_TIMEOUT)

    def _status(self, method: str, path: str) -> int | None:
        """The HTTP status of a request without a body whose answer is not needed; None when the
        engine gave none (down, reset, not HTTP)."""
        request = urllib.request.Request(self.url + path, data=b"" if method == "POST" else None, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=LIST_TIMEOUT) as resp:  # noqa: S310 (the engine beside us)
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def healthy(self) -> bool:
        """Whether ``/health`` says 200: SGLang says 503 until its warm-up generation is over."""
        return self._status("GET", "/health") == 200

    def freeze_gc(self) -> int | None:
        """Ask SGLang to move what its processes hold now out of the garbage collector's reach
        (``POST /freeze_gc``; its HTTP, scheduler and detokenizer processes each call gc.freeze()).
        Without it, a full collection of the HTTP process's ~800,000 start-up objects pauses it about
        0.4 s, and every request in flight waits that long for its first token (measured on a real
        engine, e2e/gpu/serve/RESULTS.md). The HTTP status (200: frozen), None without an answer."""
        return self._status("POST", "/freeze_gc")

    def _timed_out(self, message: str) -> Answer:
        """An update without an answer: stuck only if the engine runs no request it could wait for
        (an unload waits for the adapter's requests; a load waits behind a pending unload)."""
        running = self.running()
        if running == 0:
            return Answer(False, message, timed_out=True, stuck=True)
        why = f"{running} requests running" if running else "the engine's metrics unreadable"
        return Answer(False, f"{message}, {why}", timed_out=True)

    def running(self) -> int | None:
        """Requests the engine is generating now (its ``sglang:num_running_reqs``), None when unknown."""
        request = urllib.request.Request(self.url + "/metrics")  # noqa: S310 (the engine beside us)
        try:
            with urllib.request.urlopen(request, timeout=LIST_TIMEOUT) as resp:  # noqa: S310
                text = resp.read().decode(errors="replace")
        except (OSError, ValueError):
            return None
        found = _RUNNING.findall(text)
        try:
            return round(sum(float(v) for v in found)) if found else None
        except (ValueError, OverflowError):  # NaN or infinite: nothing to judge by
            return None


class LlamaServer:
    """llama.cpp's ``llama-server``: its adapters are the files of its command line, fixed at its
    start, so nothing is ever loaded or unloaded here; it is only asked what it has."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str) -> Any:
        try:
            code, body = _call(self.url, "GET", path, None, LIST_TIMEOUT)
        except (OSError, ValueError) as exc:
            raise EngineDown(f"{self.url}{path}: {exc}") from exc
        if code != 200:
            raise EngineDown(f"{path} answered {code}")
        return body

    def adapter_files(self) -> list[str]:
        """The path of each adapter file it was started with, as ``GET /lora-adapters`` lists them
        (``[{"id", "path", "scale"}, ...]``). Asked only once ``/health`` says the model is loaded:
        until then it answers 503."""
        self._get("/health")
        body = self._get("/lora-adapters")
        if not isinstance(body, list) or not all(isinstance(e, dict) for e in body):
            raise EngineDown("/lora-adapters answered something other than a list of adapters")
        return [str(e.get("path") or "") for e in body]
