"""The table of e2e/gpu/run_gpus.sh: per configuration, throughput, loss and what each GPU held.

python e2e/gpu/gpu_table.py DIR   (DIR holds summary-<name>.json and smi-<name>.csv)
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path


def gpu_use(path: Path) -> dict[int, tuple[int, float]]:
    """Per GPU index: peak memory used (MiB) and the share of samples with the GPU busy."""
    peak: dict[int, int] = defaultdict(int)
    busy: dict[int, list[bool]] = defaultdict(list)
    with path.open() as handle:
        for row in csv.reader(handle):
            if len(row) != 4:
                continue  # a line cut by the sampler's end
            try:
                index, used, util = int(row[1]), int(row[2]), int(row[3])
            except ValueError:
                continue
            peak[index] = max(peak[index], used)
            busy[index].append(util > 0)
    return {i: (peak[i], sum(busy[i]) / len(busy[i])) for i in sorted(peak)}


def main(folder: Path) -> None:
    print(
        "| configuration | GPUs seen | tokens/s (status) | samples/s | train s | loss first -> last "
        "| per GPU: peak MiB, busy share |"
    )
    print("|---|---|---|---|---|---|---|")
    for summary_path in sorted(folder.glob("summary-*.json")):
        name = summary_path.stem.removeprefix("summary-")
        s = json.loads(summary_path.read_text())
        smi = folder / f"smi-{name}.csv"
        use = gpu_use(smi) if smi.exists() else {}
        gpus = "; ".join(f"{i}: {mib} MiB, {share:.0%}" for i, (mib, share) in use.items())
        print(
            f"| {name} | {s.get('visible_gpus')} | {s.get('status_tokens_per_second')} | "
            f"{s.get('trainer_samples_per_second')} | {s.get('trainer_runtime_s')} | "
            f"{s['loss_first']:.3f} -> {s['loss_last']:.3f} | {gpus} |"
        )
    for missing in sorted(p.stem.removeprefix("smi-") for p in folder.glob("smi-*.csv")):
        if not (folder / f"summary-{missing}.json").exists():
            use = gpu_use(folder / f"smi-{missing}.csv")
            gpus = "; ".join(f"{i}: {mib} MiB, {share:.0%}" for i, (mib, share) in use.items())
            print(f"| {missing} | failed | | | | | {gpus} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
