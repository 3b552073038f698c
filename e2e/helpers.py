"""Waiting on conditions (never on time) and reading API errors."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import yaml

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns a truthy value; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)
        last = check()
    return last


def api_error(exc: kubernetes.client.ApiException) -> tuple[str, list[str]]:
    """The apiserver's message and the fields named in its causes."""
    body: dict[str, Any] = json.loads(exc.body or "{}")
    causes = body.get("details", {}).get("causes", [])
    return body.get("message", ""), [c.get("field", "") for c in causes]


def write_token_kubeconfig(path: Path, server: str, ca: Path, token: str) -> Path:
    """A kubeconfig that authenticates with one ServiceAccount token, as a pod would."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": str(ca)}}],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
                "current-context": "c",
            }
        )
    )
    return path


def wait_earlier_namespaces_gone(api: kubernetes.client.ApiClient, timeout: float = 180) -> None:
    """Earlier tests' namespaces still being emptied hold simulated GPUs and cause writes: wait them out."""
    core = kubernetes.client.CoreV1Api(api)
    wait_for(
        lambda: all(ns.status.phase != "Terminating" for ns in core.list_namespace().items),
        timeout,
        "earlier tests' namespaces gone",
    )


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> tuple[int, str]:
    """Status and body of a GET (or, with ``body``, a JSON POST) on loopback; 0 and the error while
    nothing listens."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})  # noqa: S310 (loopback)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)
