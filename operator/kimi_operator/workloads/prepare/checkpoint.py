"""Reading a Kimi K2.5 checkpoint's layout: config, quantization scheme, index, shard headers.

Everything here is checked before any expensive step, so that a corrupt or unexpected checkpoint
fails in seconds with a message naming the file and tensor, not hours into a conversion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

from kimi_operator.workloads.safetensors_io import Reader, SafetensorsError

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
PACKED, SCALE, SHAPE = ".weight_packed", ".weight_scale", ".weight_shape"


class CheckpointError(ValueError):
    """The checkpoint is not what it claims to be; the message names the file and the tensor."""


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """The compressed-tensors scheme of the routed experts."""

    num_bits: int
    group_size: int


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """One quantized weight: its three tensors and the dense shape they stand for."""

    base: str
    rows: int
    cols: int

    @property
    def output_name(self) -> str:
        return f"{self.base}.weight"


@dataclasses.dataclass
class Checkpoint:
    root: Path
    config: dict[str, Any]
    scheme: QuantScheme | None
    weight_map: dict[str, str]
    # Shard file -> tensor name -> (dtype, shape), from the shard headers.
    headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]]
    packed: dict[str, PackedWeight]

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Kimi K2.5 nests the language model's config under text_config; K2 keeps it at the top."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def quant_scheme(config: dict[str, Any], path: Path) -> QuantScheme | None:
    quant = text_config(config).get("quantization_config") or config.get("quantization_config")
    if not quant:
        return None
    where = f"{path}: quantization_config"
    if quant.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{where}: quant_method {quant.get('quant_method')!r}, expected 'compressed-tensors'")
    if quant.get("format") != "pack-quantized":
        raise CheckpointError(f"{where}: format {quant.get('format')!r}, expected 'pack-quantized'")
    groups = quant.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values()]
    if len(weights) != 1:
        raise CheckpointError(f"{where}: expected one config group, found {len(weights)}")
    (w,) = weights
    for key, expected in (("num_bits", 4), ("type", "int"), ("symmetric", True), ("strategy", "group")):
        if w.get(key) != expected:
            raise CheckpointError(f"{where}: weights.{key} is {w.get(key)!r}, expected {expected!r}")
    group_size = w.get("group_size")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise CheckpointError(f"{where}: weights.group_size {group_size!r} is not a positive multiple of 8")
    return QuantScheme(num_bits=4, group_size=group_size)


def open_checkpoint(root: Path) -> Checkpoint:
    """Read and cross-check config, index and every shard header (no tensor data is read)."""
    config = _load_json(root / CONFIG)
    if not isinstance(config, dict):
        raise CheckpointError(f"{root / CONFIG}: not a JSON object")
    scheme = quant_scheme(config, root / CONFIG)
    index = _load_json(root / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{root / INDEX}: no weight_map")
    headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for shard in sorted(set(weight_map.values())):
        path = root / shard
        if not path.exists():
            names = sorted(n for n, s in weight_map.items() if s == shard)
            raise CheckpointError(
                f"{root / INDEX}: names shard {shard} (for {len(names)} tensors, e.g. {names[0]}), which does not exist"
            )
        try:
            with Reader(path) as reader:
                headers[shard] = {n: (t.dtype, t.shape) for n, t in reader.tensors.items()}
        except SafetensorsError as exc:
            raise CheckpointError(str(exc)) from exc
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise CheckpointError(f"{root / shard}: tensor {name} is listed in {INDEX} but missing from the shard")
    packed = _packed_weights(root, weight_map, headers, scheme)
    return Checkpoint(root, config, scheme, dict(weight_map), headers, packed)


def _packed_weights(
    root: Path,
    weight_map: dict[str, str],
    headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]],
    scheme: QuantScheme | None,
) -> dict[str, PackedWeight]:
    bases = [n[: -len(PACKED)] for n in weight_map if n.endswith(PACKED)]
    if bases and scheme is None:
        raise CheckpointError(f"{root / CONFIG}: has packed weights (e.g. {bases[0]}) but no quantization_config")
    found: dict[str, PackedWeight] = {}
    # One reader per shard: its header is parsed once, not once for every weight the shard holds.
    readers: dict[str, Reader] = {}
    with contextlib.ExitStack() as stack:
        for base in bases:
            parts = {}
            for suffix, dtypes in ((PACKED, ("I32",)), (SCALE, ("BF16",)), (SHAPE, ("I32", "I64"))):
                name = base + suffix
                if name not in weight_map:
                    raise CheckpointError(f"{root / INDEX}: {base}{PACKED} has no {name}")
                dtype, shape = headers[weight_map[name]][name]
                if dtype not in dtypes:
                    raise CheckpointError(
                        f"{root / weight_map[name]}: tensor {name} is {dtype}, expected {' or '.join(dtypes)}"
                    )
                parts[suffix] = shape
            shard = weight_map[base + SHAPE]
            if parts[SHAPE] != (2,):
                raise CheckpointError(
                    f"{root / shard}: tensor {base}{SHAPE} has shape {list(parts[SHAPE])}, expected [2]"
                )
            if shard not in readers:
                readers[shard] = Reader(root / shard)
                stack.callback(readers[shard].close)
            rows, cols = (int(v) for v in readers[shard].view(base + SHAPE))
            assert scheme is not None
            where = f"{root / weight_map[base + PACKED]}: tensor {base}"
            if cols % 8 or cols % scheme.group_size:
                raise CheckpointError(
                    f"{where}: group size {scheme.group_size} does not divide the row of {cols} columns"
                )
            if parts[PACKED] != (rows, cols // 8):
                raise CheckpointError(
                    f"{where}{PACKED}: shape {list(parts[PACKED])}, expected {[rows, cols // 8]} for {rows}x{cols}"
                )
            if parts[SCALE] != (rows, cols // scheme.group_size):
                raise CheckpointError(
                    f"{where}{SCALE}: shape {list(parts[SCALE])}, expected {[rows, cols // scheme.group_size]}"
                )
            found[base] = PackedWeight(base, rows, cols)
    return found
