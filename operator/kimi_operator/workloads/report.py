"""How a prepare pod reports: its own progress in its KimiModel's status, and lines on stdout.

The pod writes only ``status.nodes[name=<its node>].progress``, by server-side apply under a field
manager of its own, with a ServiceAccount whose Role allows patching this one KimiModel's status.
On a terminal it draws a progress line; otherwise it prints one JSON object per update.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import kubernetes
from kubernetes.dynamic import DynamicClient

from kimi_operator.api.base import API_VERSION
from kimi_operator.api.conditions import now_rfc3339
from kimi_operator.api.kimimodel import KIND, PLURAL, NodeProgress, PrepareStep


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Rate:
    """Bytes per second over a sliding window of recent samples."""

    def __init__(self, window: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.clock = window, clock
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, done: int) -> float | None:
        now = self.clock()
        if self.samples and done < self.samples[-1][1]:
            self.samples.clear()  # a new step started
        self.samples.append((now, done))
        while self.samples and now - self.samples[0][0] > self.window:
            self.samples.popleft()
        first_t, first_done = self.samples[0]
        return (done - first_done) / (now - first_t) if now > first_t else None


def progress(
    step: PrepareStep,
    done: int,
    total: int,
    rate: float | None,
    revision: str | None,
    *,
    gguf_revision: str | None = None,
    gguf_entry: str | None = None,
) -> NodeProgress:
    eta = _hms((total - done) / rate) if rate and rate > 0 and total >= done else None
    return NodeProgress(
        step=step,
        bytes_done=done,
        bytes_total=total,
        percent=min(100, int(done * 100 / total)) if total else 100,
        bytes_per_second=int(rate) if rate is not None else None,
        eta=eta,
        revision=revision,
        gguf_revision=gguf_revision,
        gguf_entry=gguf_entry,
        update_time=now_rfc3339(),
    )


class OwnStatus:
    """Server-side apply of the fields a workload pod owns in its object's status, under its own
    field manager; the pod's Role allows this one object only."""

    def __init__(
        self, api: kubernetes.client.ApiClient, *, kind: str, plural: str, namespace: str, name: str, manager: str
    ) -> None:
        self.client = DynamicClient(api)
        self.kind, self.namespace, self.name = kind, namespace, name
        self.path = f"/apis/{API_VERSION}/namespaces/{namespace}/{plural}/{name}/status"
        self.field_manager = manager[:128]

    def apply(self, status: dict[str, Any]) -> None:
        body = {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "status": status,
        }
        self.client.request(
            "patch",
            self.path,
            body=body,
            content_type="application/apply-patch+yaml",
            field_manager=self.field_manager,
            force=True,
        )


class StatusWriter:
    """One node's progress in its KimiModel's status."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, name: str, node: str) -> None:
        self.node = node
        # One manager per node: the pods of different nodes never take each other's fields.
        self.own = OwnStatus(
            api, kind=KIND, plural=PLURAL, namespace=namespace, name=name, manager=f"kimi-prepare-{node}"
        )

    def write(self, record: NodeProgress) -> None:
        self.own.apply({"nodes": [{"name": self.node, "progress": record.to_wire()}]})


class Reporter:
    """Rate-limited progress: to the terminal or stdout, and to the status when a writer is given."""

    def __init__(
        self,
        writer: StatusWriter | None = None,
        *,
        stream: TextIO | None = None,
        min_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Looked up when writing, so a redirected sys.stdout is honoured.
        self._stream, self.min_interval, self.clock = stream, min_interval, clock
        self.writer = writer
        self.rate = Rate(clock=clock)
        self.revision: str | None = None
        self.gguf_revision: str | None = None
        self.gguf_entry: str | None = None
        self._last: tuple[float, str] | None = None
        self.failures = 0

    def __call__(self, step: PrepareStep, done: int, total: int) -> None:
        rate = self.rate.add(done)
        now = self.clock()
        # Always report a new step and its end; in between, at most once per interval.
        boundary = self._last is None or self._last[1] != step or done >= total
        if not boundary and self._last is not None and now - self._last[0] < self.min_interval:
            return
        self._last = (now, step)
        record = progress(
            step, done, total, rate, self.revision, gguf_revision=self.gguf_revision, gguf_entry=self.gguf_entry
        )
        self._print(record)
        if self.writer is not None:
            try:
                self.writer.write(record)
            except kubernetes.client.ApiException as exc:
                # Progress is best effort: the work goes on, the failure is visible in the log.
                self.failures += 1
                self._print_error(f"could not write progress to status: {exc.status} {exc.reason}")

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def _print(self, record: NodeProgress) -> None:
        wire: dict[str, Any] = record.to_wire()
        if self.stream.isatty():
            rate = f"{record.bytes_per_second / 2**20:.1f} MiB/s" if record.bytes_per_second else "-"
            done_gib, total_gib = record.bytes_done / 2**30, record.bytes_total / 2**30
            line = (
                f"\r{record.step:<15} {record.percent:3d}% {done_gib:8.2f}/{total_gib:.2f} GiB "
                f"{rate:>12} ETA {record.eta or '-'}"
            )
            self.stream.write(line + ("\n" if record.percent >= 100 else ""))
        else:
            self.stream.write(json.dumps({"event": "progress", **wire}) + "\n")
        self.stream.flush()

    def _print_error(self, message: str) -> None:
        sys.stderr.write(json.dumps({"event": "warning", "message": message}) + "\n")
