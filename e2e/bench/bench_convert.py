"""Benchmark of the INT4 -> BF16 converter (``make bench-convert``): not a test.

Builds synthetic Kimi-shaped shards (routed experts 2048x7168 / 7168x2048, int4 group 32) with at
least 2 GB of packed expert weights, then measures in one run, on the same bytes:
  ours       convert() in a child process (output GB/s, peak RSS)
  reference  compressed-tensors' per-tensor decompression, written with safetensors (oracle env)
  copy       a plain copy of our output files (the memory/disk bandwidth ceiling)
and prints output GB/s for each, the ratios, and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kimi_operator.workloads.safetensors_io import PlannedTensor, Reader, Writer

HIDDEN, INTER, GROUP = 7168, 2048, 32
REFERENCE = """
import sys, time, json
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
scheme = QuantizationScheme(targets=["Linear"], weights=args)
torch.set_num_threads(int(sys.argv[3]))
started = time.perf_counter()
written = 0
for shard in sorted(src.glob("*.safetensors")):
    result = {}
    with safe_open(str(shard), "pt") as f:
        names = list(f.keys())
        bases = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith(".weight_packed")})
        for base in bases:
            state = {k: f.get_tensor(f"{base}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
            result[f"{base}.weight"] = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    save_file(result, str(out / shard.name))
    written += sum(t.numel() * t.element_size() for t in result.values())
print(json.dumps({"seconds": time.perf_counter() - started, "bytes": written}))
"""
REFERENCE_COMPUTE = """
import sys, time, json
from pathlib import Path
import torch
from safetensors import safe_open
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
scheme = QuantizationScheme(targets=["Linear"], weights=args)
torch.set_num_threads(int(sys.argv[2]))
elapsed, produced = 0.0, 0
for shard in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(shard), "pt") as f:
        for base in sorted({n.rsplit(".", 1)[0] for n in f.keys() if n.endswith(".weight_packed")}):
            state = {k: f.get_tensor(f"{base}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
            started = time.perf_counter()
            weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
            elapsed += time.perf_counter() - started
            produced += weight.numel() * weight.element_size()
print(json.dumps({"seconds": elapsed, "bytes": produced}))
"""
OURS_COMPUTE = """
import sys, time, json
from pathlib import Path
import numpy as np
from kimi_operator.workloads.prepare.dequant import dequantize_fast
from kimi_operator.workloads.safetensors_io import Reader
elapsed, produced = 0.0, 0
for shard in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with Reader(shard) as r:
        for name in sorted(n for n in r.tensors if n.endswith(".weight_packed")):
            base = name.rsplit(".", 1)[0]
            packed, scale = np.array(r.view(name)), np.array(r.view(base + ".weight_scale"))
            rows, cols = (int(v) for v in r.view(base + ".weight_shape"))
            started = time.perf_counter()
            out = dequantize_fast(base, packed, scale, (rows, cols), 32, threads=int(sys.argv[2]))
            elapsed += time.perf_counter() - started
            produced += out.nbytes
print(json.dumps({"seconds": elapsed, "bytes": produced}))
"""
CHILD = """
import json, sys, time
from pathlib import Path
from kimi_operator.workloads.prepare.convert import convert
started = time.perf_counter()
result = convert(Path(sys.argv[1]), Path(sys.argv[2]), threads=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - started, "bytes": result.bytes_written}))
"""


def make_shards(root: Path, layers: int, experts: int, shards: int, seed: int) -> tuple[int, int]:
    """Write the synthetic checkpoint; return (packed expert bytes, largest shard bytes)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for layer in range(1, layers + 1):
        for e in range(experts):
            for proj, (rows, cols) in (
                ("gate_proj", (INTER, HIDDEN)),
                ("up_proj", (INTER, HIDDEN)),
                ("down_proj", (HIDDEN, INTER)),
            ):
                names.append((f"language_model.model.layers.{layer}.mlp.experts.{e}.{proj}", rows, cols))
    per_shard = -(-len(names) // shards)
    weight_map, packed_bytes, largest = {}, 0, 0
    for i in range(shards):
        chunk = names[i * per_shard : (i + 1) * per_shard]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        plan = []
        for base, rows, cols in chunk:
            plan += [
                PlannedTensor(f"{base}.weight_packed", "I32", (rows, cols // 8)),
                PlannedTensor(f"{base}.weight_scale", "BF16", (rows, cols // GROUP)),
                PlannedTensor(f"{base}.weight_shape", "I64", (2,)),
            ]
        writer = Writer(root / shard, plan)
        for base, rows, cols in chunk:
            packed = rng.integers(-(2**31), 2**31, size=(rows, cols // 8), dtype=np.int64).astype(np.int32)
            # Scales of realistic magnitude (about 1e-4 .. 1e-2) as bf16 bit patterns.
            scale = (
                rng.uniform(1e-4, 1e-2, size=(rows, cols // GROUP)).astype(np.float32).view(np.uint32) >> 16
            ).astype(np.uint16)
            writer.write(f"{base}.weight_packed", packed)
            writer.write(f"{base}.weight_scale", scale)
            writer.write(f"{base}.weight_shape", np.array([rows, cols], dtype=np.int64))
            packed_bytes += packed.nbytes
            weight_map.update({f"{base}.{k}": shard for k in ("weight_packed", "weight_scale", "weight_shape")})
        writer.commit()
        largest = max(largest, (root / shard).stat().st_size)
    quant = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP},
            }
        },
    }
    (root / "config.json").write_text(
        json.dumps({"model_type": "kimi_k25", "text_config": {"quantization_config": quant}})
    )
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return packed_bytes, largest


def timed_child(cmd: list[str]) -> tuple[dict[str, float], int]:
    """Run one contender; its time runs until its output is on disk (all three pay the same sync)."""
    os.sync()  # start each contender with no dirty pages left by the previous one
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.sync()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["compute_seconds"] = result["seconds"]
    result["seconds"] = seconds
    return result, max(peak, before) * 1024


def same_tensors(ours: Path, reference: Path) -> bool:
    """Every tensor of the reference output has the same bytes in ours."""
    for shard in sorted(reference.glob("*.safetensors")):
        with Reader(shard) as ref, Reader(ours / shard.name) as mine:
            for name in ref.tensors:
                if bytes(ref.raw(name)) != bytes(mine.raw(name)):
                    return False
    return True


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def memory_copy(nbytes: int, chunk: int = 256 << 20) -> dict[str, float]:
    """Copying the same number of bytes from memory to memory: the bandwidth ceiling without disk."""
    src, dst = np.ones(chunk, dtype=np.uint8), np.empty(chunk, dtype=np.uint8)
    started, copied = time.perf_counter(), 0
    while copied < nbytes:
        np.copyto(dst, src)
        copied += chunk
    return {"seconds": time.perf_counter() - started, "bytes": copied}


def copy_files(src: Path, dst: Path) -> dict[str, float]:
    dst.mkdir(parents=True, exist_ok=True)
    os.sync()
    started, copied = time.perf_counter(), 0
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
        copied += f.stat().st_size
    os.sync()
    return {"seconds": time.perf_counter() - started, "bytes": copied}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (about 20 GB)")
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    parser.add_argument("--oracle-python", required=True, help="python of the oracle environment")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=24)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    src = args.work / "int4"
    packed_bytes, largest_shard = make_shards(src, args.layers, args.experts, args.shards, seed=0)
    print(
        f"synthetic checkpoint: {packed_bytes / 1e9:.2f} GB of packed int4 experts in {args.shards} shards", flush=True
    )
    ours, ours_rss = timed_child([sys.executable, "-c", CHILD, str(src), str(args.work / "ours"), str(args.threads)])
    reference, _ = timed_child(
        [args.oracle_python, "-c", REFERENCE, str(src), str(args.work / "reference"), str(args.threads)]
    )
    copy = copy_files(args.work / "ours", args.work / "copy")
    # Per-tensor decompression alone, inputs already in memory: the compute side, without disk or hashing.
    ours_compute = json.loads(_run([sys.executable, "-c", OURS_COMPUTE, str(src), str(args.threads)]))
    reference_compute = json.loads(_run([args.oracle_python, "-c", REFERENCE_COMPUTE, str(src), str(args.threads)]))
    memcpy = memory_copy(ours_compute["bytes"])
    identical = same_tensors(args.work / "ours", args.work / "reference")
    gbps = {
        name: r["bytes"] / r["seconds"] / 1e9 for name, r in (("ours", ours), ("reference", reference), ("copy", copy))
    }
    rss_budget = 2 * largest_shard + 512 * 2**20
    compute = {
        name: r["bytes"] / r["seconds"] / 1e9
        for name, r in (("ours", ours_compute), ("reference", reference_compute), ("memory_copy", memcpy))
    }
    result = {
        "packed_int4_bytes": packed_bytes,
        "output_bytes": ours["bytes"],
        "threads": args.threads,
        "seconds": {"ours": ours["seconds"], "reference": reference["seconds"], "copy": copy["seconds"]},
        # Time inside each converter before the final sync: the compute side of the figures.
        "seconds_before_sync": {"ours": ours["compute_seconds"], "reference": reference["compute_seconds"]},
        "output_gb_per_s": gbps,
        "ratio_vs_reference": gbps["ours"] / gbps["reference"],
        "ratio_vs_copy": gbps["ours"] / gbps["copy"],
        "per_tensor_compute_gb_per_s": compute,
        "per_tensor_ratio_vs_reference": compute["ours"] / compute["reference"],
        "per_tensor_ratio_vs_memory_copy": compute["ours"] / compute["memory_copy"],
        "peak_rss_bytes": ours_rss,
        "rss_budget_bytes": rss_budget,
        "targets": {
            "vs_reference_at_least_5x": {
                "end_to_end": gbps["ours"] / gbps["reference"] >= 5,
                "per_tensor": compute["ours"] / compute["reference"] >= 5,
            },
            "vs_copy_at_least_0.4x": {
                "end_to_end": gbps["ours"] / gbps["copy"] >= 0.4,
                "per_tensor": compute["ours"] / compute["memory_copy"] >= 0.4,
            },
            "rss_within_two_shards_plus_512mb": ours_rss <= rss_budget,
        },
        "bit_identical_to_reference": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("ours", "reference", "copy"):
        print(f"{name:>9}: {gbps[name]:6.2f} GB/s output  ({result['seconds'][name]:.1f} s)")
    print(f"ours / reference = {result['ratio_vs_reference']:.1f}x   ours / copy = {result['ratio_vs_copy']:.2f}x")
    print("per-tensor decompression, in memory, no disk:")
    for name in ("ours", "reference", "memory_copy"):
        print(f"{name:>12}: {compute[name]:6.2f} GB/s output")
    print(
        f"ours / reference = {result['per_tensor_ratio_vs_reference']:.1f}x   "
        f"ours / memory copy = {result['per_tensor_ratio_vs_memory_copy']:.2f}x"
    )
    print(f"peak RSS {ours_rss / 2**20:.0f} MiB (budget {rss_budget / 2**20:.0f} MiB: two shards + 512 MiB)")
    print(f"bit-identical to compressed-tensors: {identical}")
    print(f"written to {args.out}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
