"""SGLang's adapter API as the agent uses it (REFERENCE.md, "SGLang multi-LoRA"), over plain HTTP.

Only the answers are interpreted here; what to load and unload is decided in ``sync``.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from typing import Any


class EngineDown(Exception):
    """The engine did not answer (starting, restarting, or gone)."""


@dataclasses.dataclass(frozen=True)
class Answer:
    ok: bool
    message: str


class Engine:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 (the engine beside us, an http URL we were given)
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:  # noqa: S310
                return int(resp.status), json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw or b"null")
            except ValueError:
                return exc.code, {"error_message": raw.decode(errors="replace")}
        except (OSError, ValueError) as exc:
            raise EngineDown(f"{self.url}{path}: {exc}") from exc

    def models(self, served: str) -> dict[str, str]:
        """Adapter name -> the path it was loaded from, as /v1/models lists them (the base excluded)."""
        code, body = self._call("GET", "/v1/models")
        if code != 200 or not isinstance(body, dict):
            raise EngineDown(f"/v1/models answered {code}")
        cards = body.get("data") or []
        return {str(c["id"]): str(c.get("root") or "") for c in cards if c.get("id") != served and c.get("parent")}

    def _adapter_call(self, path: str, body: dict[str, Any]) -> Answer:
        code, answer = self._call("POST", path, body)
        if not isinstance(answer, dict):
            return Answer(False, f"HTTP {code}")
        ok = code == 200 and bool(answer.get("success"))
        message = str(answer.get("error_message") or answer.get("message") or ("" if ok else f"HTTP {code}"))
        return Answer(ok, message)

    def load(self, name: str, path: str, *, pinned: bool = False) -> Answer:
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if pinned:
            body["pinned"] = True
        return self._adapter_call("/load_lora_adapter", body)

    def unload(self, name: str) -> Answer:
        return self._adapter_call("/unload_lora_adapter", {"lora_name": name})
