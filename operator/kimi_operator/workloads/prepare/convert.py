"""Streaming INT4 -> BF16 conversion of a checkpoint's routed experts, shard by shard.

Each output shard keeps its input's name and is written under ``<name>.partial``, renamed when
complete; a rerun skips shards already renamed, so an interrupted conversion resumes and gives the
same bytes. Peak memory is one output tensor plus the pages of the mapped input. The index and the
config (without quantization_config) are written after the shards, and the completion manifest
(every file with its size and sha256) last: a directory without it is never taken as complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kimi_operator.workloads import manifest
from kimi_operator.workloads.diskspace import require_free
from kimi_operator.workloads.prepare import dequant, native
from kimi_operator.workloads.prepare.checkpoint import (
    CONFIG,
    INDEX,
    PACKED,
    SCALE,
    SHAPE,
    Checkpoint,
    CheckpointError,
    open_checkpoint,
    text_config,
)
from kimi_operator.workloads.safetensors_io import PlannedTensor, Reader, Writer, digest_path, planned_size

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    shard: str
    tensors: list[PlannedTensor]

    @property
    def size(self) -> int:
        return planned_size(self.tensors)


def plan(ckpt: Checkpoint) -> list[ShardPlan]:
    """Output tensors per shard, in the input's order: packed triples become one BF16 weight."""
    plans = []
    for shard in ckpt.shards:
        out: list[PlannedTensor] = []
        for name, (dtype, shape) in ckpt.headers[shard].items():
            if ckpt.weight_map.get(name) != shard:
                continue  # not indexed: not part of the model
            if name.endswith(PACKED):
                weight = ckpt.packed[name[: -len(PACKED)]]
                out.append(PlannedTensor(weight.output_name, "BF16", (weight.rows, weight.cols)))
            elif name.endswith((SCALE, SHAPE)) and name.rsplit(".", 1)[0] in ckpt.packed:
                continue
            else:
                out.append(PlannedTensor(name, dtype, shape))
        plans.append(ShardPlan(shard, out))
    return plans


def _finished(shard: Path) -> bool:
    """A shard from an earlier run counts only if it still matches the digest recorded while writing."""
    recorded = digest_path(shard)
    if not (shard.exists() and recorded.exists()):
        return False
    return manifest.sha256_file(shard) == recorded.read_text().strip()


def _sync(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def bytes_needed(ckpt: Checkpoint, out_dir: Path) -> int:
    """Bytes still to write into ``out_dir`` (shards already complete count for nothing)."""
    return sum(p.size for p in plan(ckpt) if not (out_dir / p.shard).exists())


def _side_files(root: Path) -> list[Path]:
    """Tokenizer, code and other small files that travel with the weights unchanged."""
    skip = {INDEX, CONFIG}
    return [
        p
        for p in sorted(root.iterdir())
        if p.is_file()
        and p.suffix != ".safetensors"
        and p.name not in skip
        and not p.name.endswith((".partial", ".sha256"))
        and p.name != "manifest.json"
    ]


def converted_config(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(config))
    out.pop("quantization_config", None)
    text_config(out).pop("quantization_config", None)
    return out


def _write_json(path: Path, data: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.rename(path)


def choose_kernel(use_native: bool) -> bool:
    """Whether the compiled kernel runs (True) or the numpy one (False); built here, once, so that a
    machine without a C compiler (or whose build fails) converts with numpy instead of failing."""
    if not use_native:
        log.info("dequantization kernel: numpy (the native kernel was not asked for)")
        return False
    try:
        native.kernel()
    except native.NativeUnavailable as exc:
        log.warning("native dequantization kernel unavailable, falling back to numpy: %s", exc)
        log.info("dequantization kernel: numpy (the native kernel is unavailable)")
        return False
    log.info("dequantization kernel: native")
    return True


@dataclasses.dataclass
class Result:
    shards_written: list[str]
    shards_skipped: list[str]
    bytes_written: int


def convert(
    src: Path,
    out_dir: Path,
    *,
    threads: int | None = None,
    on_progress: Progress | None = None,
    use_native: bool = True,
    revision: str | None = None,
) -> Result:
    """Convert ``src`` into ``out_dir``; see the module docstring for the guarantees."""
    ckpt = open_checkpoint(src)
    if ckpt.scheme is None:
        raise CheckpointError(f"{src / CONFIG}: no quantization_config: nothing to convert")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / manifest.MANIFEST).unlink(missing_ok=True)
    plans = plan(ckpt)
    todo = [p for p in plans if not _finished(out_dir / p.shard)]
    total = sum(p.size for p in todo)
    # Checked again here, right before the expensive step, with the exact bytes still to write.
    require_free(out_dir, total + sum(f.stat().st_size for f in _side_files(src)), what="BF16 conversion")
    # Progress counts tensor bytes, so it ends exactly at its total.
    tensor_bytes = sum(t.nbytes for p in todo for t in p.tensors)
    # Decided once, before any shard: every tensor of the run goes through the same kernel.
    fast = choose_kernel(use_native) if todo else False
    shard_writer = _ShardConverter(ckpt, out_dir, threads or os.cpu_count() or 1, fast, tensor_bytes, on_progress)
    try:
        for shard_plan in todo:
            shard_writer.write(shard_plan)
    finally:
        shard_writer.close()
    weight_map = {t.name: p.shard for p in plans for t in p.tensors}
    for side in _side_files(src):
        shutil.copyfile(side, out_dir / side.name)
    _write_json(
        out_dir / INDEX,
        {
            "metadata": {"total_size": sum(t.nbytes for p in plans for t in p.tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        },
    )
    _write_json(out_dir / CONFIG, converted_config(ckpt.config))
    # Everything on disk before the manifest says the variant is complete.
    _sync([out_dir / p.shard for p in plans] + [out_dir / INDEX, out_dir / CONFIG])
    manifest.write(out_dir, variant="bf16", revision=revision, tools={"numpy": np.__version__})
    return Result([p.shard for p in todo], [p.shard for p in plans if p not in todo], total)


@dataclasses.dataclass
class _ShardConverter:
    """Writes planned shards one after the other, keeping the input shards mapped between them."""

    ckpt: Checkpoint
    out_dir: Path
    threads: int
    use_native: bool
    total: int
    on_progress: Progress | None
    done: int = 0
    readers: dict[str, Reader] = dataclasses.field(default_factory=dict)

    def _reader(self, name: str) -> Reader:
        shard = self.ckpt.weight_map[name]
        if shard not in self.readers:
            self.readers[shard] = Reader(self.ckpt.root / shard)
        return self.readers[shard]

    def _dense(self, base: str) -> np.ndarray[Any, Any]:
        assert self.ckpt.scheme is not None
        weight = self.ckpt.packed[base]
        packed = self._reader(base + PACKED).view(base + PACKED)
        scale = self._reader(base + SCALE).view(base + SCALE)
        shape, group = (weight.rows, weight.cols), self.ckpt.scheme.group_size
        if self.use_native:
            return dequant.dequantize_fast(base, packed, scale, shape, group, threads=self.threads)
        return dequant.dequantize(base, packed, scale, shape, group)

    def write(self, shard_plan: ShardPlan) -> None:
        writer = Writer(self.out_dir / shard_plan.shard, shard_plan.tensors)
        # Writing and hashing one tensor overlaps computing the next; at most two outputs are alive.
        pending: Future[None] | None = None
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as io:
                for tensor in shard_plan.tensors:
                    base = tensor.name.removesuffix(".weight")
                    if base != tensor.name and base in self.ckpt.packed:
                        data: Any = self._dense(base)
                    else:
                        data = self._reader(tensor.name).raw(tensor.name)
                    if pending is not None:
                        pending.result()
                    pending = io.submit(writer.write, tensor.name, data)
                    self.done += tensor.nbytes
                    if self.on_progress:
                        self.on_progress(self.done, self.total)
                if pending is not None:
                    pending.result()
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            # Unmapping the inputs after each shard keeps resident memory at about one shard.
            self.close()

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
