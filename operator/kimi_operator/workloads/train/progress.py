"""Training progress: ``trainer_log.jsonl`` as LLaMA-Factory writes it, turned into the
FineTuneJob's ``status.progress`` and ``latestCheckpoint`` by the training pod."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_operator.api.conditions import now_rfc3339
from kimi_operator.api.durations import seconds
from kimi_operator.workloads.events import emit

if TYPE_CHECKING:
    from kimi_operator.workloads.report import OwnStatus

TRAINER_LOG = "trainer_log.jsonl"


# transformers-kt's completion marker of a checkpoint saved by several KT processes, written after
# every rank's optimizer file (and after trainer_state.json): without it such a checkpoint is refused
# at resume, on every retry.
KT_OPTIMIZER_INDEX = "kt_optimizer.index.json"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-<step>`` that was written completely: its trainer state exists and,
    for one saved by several KT processes (per-rank optimizer files), so does their manifest."""
    done = []
    for path in output_dir.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if not (step.isdigit() and (path / "trainer_state.json").exists()):
            continue
        if any(path.glob("optimizer_rank_*.pt")) and not (path / KT_OPTIMIZER_INDEX).exists():
            continue
        done.append((int(step), path))
    return max(done)[1] if done else None


def tokens_per_second(record: dict[str, Any], tokens_before: int) -> float | None:
    """Tokens trained per second by this process.

    LLaMA-Factory's own ``throughput`` divides every token seen, those of the run a resumed pod
    took over included, by this process's time, so after a resume it overstates the rate; the
    tokens the checkpoint had already seen are taken off here.
    """
    total, elapsed = record.get("total_tokens"), record.get("elapsed_time")
    span = seconds(elapsed) if isinstance(elapsed, str) else None
    if isinstance(total, (int, float)) and span:
        return round((total - tokens_before) / span, 2)
    throughput = record.get("throughput")
    return float(throughput) if isinstance(throughput, (int, float)) and not tokens_before else None


def tokens_seen(checkpoint: Path | None) -> int:
    """Input tokens counted up to a checkpoint (0 without one, or when the count was off)."""
    if checkpoint is None:
        return 0
    with contextlib.suppress(OSError, ValueError):
        return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen") or 0)
    return 0


def progress_from_log(record: dict[str, Any], now: str | None = None, tokens_before: int = 0) -> dict[str, Any]:
    """One ``trainer_log.jsonl`` record as the FineTuneJob's ``status.progress``."""
    progress: dict[str, Any] = {
        "step": record.get("current_steps"),
        "totalSteps": record.get("total_steps"),
        "percent": record.get("percentage"),
        "loss": record.get("loss"),
        "learningRate": record.get("lr"),
        "epoch": record.get("epoch"),
        "tokensPerSecond": tokens_per_second(record, tokens_before),
        "eta": record.get("remaining_time"),
        "lastUpdateTime": now or now_rfc3339(),
    }
    return {k: v for k, v in progress.items() if v is not None}


class LogTail:
    """New complete lines of a growing JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def records(self) -> Iterator[dict[str, Any]]:
        return (record for _, record in self.entries())

    def entries(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each new record with the file offset where its line starts."""
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        start = self.offset
        self.offset += end
        for line in data[:end].splitlines(keepends=True):
            with contextlib.suppress(ValueError):
                yield start, json.loads(line)
            start += len(line)


class Reporter:
    """Turns the trainer log into status.progress, every few seconds and once more at the end."""

    def __init__(
        self, output_dir: Path, own: OwnStatus | None, interval: float = 5.0, resumed_from: Path | None = None
    ) -> None:
        self.tail = LogTail(output_dir / TRAINER_LOG)
        self.output_dir, self.own, self.interval = output_dir, own, interval
        self.tokens_before = tokens_seen(resumed_from)
        # Lines already in the log are an earlier pod's: their step and loss still count, their
        # rate does not (it was measured against that pod's clock and token count).
        self.earlier = self.tail.path.stat().st_size if self.tail.path.exists() else 0
        self.last: dict[str, Any] | None = None
        self.status: dict[str, Any] = {}
        self.applied = False  # whether self.status reached the API (a failed write is tried again)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def poll(self) -> dict[str, Any] | None:
        # LLaMA-Factory writes a last summary line without a loss: keep the last loss seen.
        for start, record in self.tail.entries():
            progress = progress_from_log(record, tokens_before=self.tokens_before)
            if start < self.earlier:
                progress.pop("tokensPerSecond", None)
            self.last = {**(self.last or {}), **progress}
        if self.last is None:
            return None
        status: dict[str, Any] = {"progress": self.last}
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is not None:
            status["latestCheckpoint"] = str(checkpoint)
        if status == self.status and self.applied:
            return status  # nothing new in the log since the last write: no request
        self.status, self.applied = status, False
        emit({"event": "progress", **status})
        if self.own is not None:
            try:
                self.own.apply(status)
                self.applied = True
            except Exception as exc:
                emit({"event": "warning", "message": f"progress not written: {exc}"}, sys.stderr)
        return status

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
