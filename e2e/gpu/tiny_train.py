"""The tiny LoRA SFT of the CPU test, on whatever device the training environment has, measured.

Runs what the training pod runs (``kimi_operator.workloads.train.command``) with our rendered LLaMA-Factory
configuration and Kimi template on the tiny DeepSeek-V3-architecture model of
``tests/oracle/tiny_deepseek.py``, then prints one JSON summary: the device, the versions, steps,
loss, the tokens/s our reporter put in status.progress, and whether the exported adapter changes
the model's output. Used side by side on CPU and on a CUDA host (``e2e/gpu/run.sh``).

    python e2e/gpu/tiny_train.py --device cuda --work DIR [--steps 40] [--summary FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))

from kimi_operator.api.finetunejob import FineTuneJobSpec  # noqa: E402
from kimi_operator.render import llamafactory  # noqa: E402
from kimi_operator.workloads.safetensors_io import Reader  # noqa: E402

TINY = ROOT / "tests" / "oracle" / "tiny_deepseek.py"
# What differs from the GPU hosts the configuration is rendered for: no KTransformers experts on
# the tiny model (kt-kernel needs its own torch), and on CPU no bf16.
OVERRIDES = {
    "cuda": ["bf16=true", "use_kt=false", "trust_remote_code=false", "preprocessing_num_workers=1"],
    "cpu": ["use_cpu=true", "bf16=false", "use_kt=false", "trust_remote_code=false", "preprocessing_num_workers=1"],
}


def spec(*, batch: int = 4, save_steps: int = 3, gpus: int = 1) -> FineTuneJobSpec:
    """The tiny run's FineTuneJob (also the CPU test's)."""
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "tiny"},
            "resources": {"gpus": gpus},
            "dataset": {"hostPath": {"path": "/data/train.jsonl"}},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.05},
            "training": {
                "epochs": 1,
                "learningRate": 1e-3,
                "perDeviceBatchSize": batch,
                "gradientAccumulationSteps": 1,
                "cutoffLen": 256,
                "loggingSteps": 1,
                "saveSteps": save_steps,
            },
        }
    )


def run(*args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT / "operator"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{args[:2]} exited {proc.returncode}")
    return proc


def versions() -> dict[str, Any]:
    import torch  # noqa: PLC0415 (the training environment's)

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "accelerate", "llamafactory"):
        info[name] = __import__(name).__version__
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    info["visible_gpus"] = torch.cuda.device_count()
    info["cpus"] = os.cpu_count()
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=sorted(OVERRIDES), required=True)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (model, data, output)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", choices=["tiny", "kt", "small"], default="tiny", help="model size (tiny: the tests')")
    parser.add_argument(
        "--kt", action="store_true", help="keep use_kt on (KTransformers environment, CUDA) and export the expert LoRA"
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="training processes, as the pod runs one per GPU (default: the GPUs torch sees, 1 on the CPU)",
    )
    parser.add_argument("--summary", type=Path, help="also write the summary here")
    opts = parser.parse_args()
    info = versions()
    if opts.device == "cuda" and info["device"] == "cpu":
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    processes = opts.processes or max(1, info["visible_gpus"])
    work = opts.work.resolve()
    model, data, config, output = work / "model", work / "train.jsonl", work / "config", work / "out"
    work.mkdir(parents=True, exist_ok=True)
    config.mkdir(exist_ok=True)
    run(str(TINY), str(model), opts.size)
    run(str(TINY), "dataset", str(data), "96")
    files = llamafactory.config_files(
        spec(save_steps=opts.steps, gpus=processes),
        model_path=str(model),
        dataset_file=str(output / "dataset.jsonl"),
        output_dir=str(output),
        config_dir=str(config),
    )
    for name, text in files.items():
        (config / name).write_text(text)
    started = time.monotonic()
    proc = run(
        "-m",
        "kimi_operator.workloads.train.command",
        f"--config-dir={config}",
        f"--dataset={data}",
        f"--output-dir={output}",
        "--adapter-name=tiny",
        "--base-model=tiny",
        f"--node={info['device']}",
        "--report-interval=1",
        f"--set=max_steps={opts.steps}",
        f"--processes={processes}",
        *(f"--set={pair}" for pair in OVERRIDES[opts.device] if not (opts.kt and pair == "use_kt=false")),
        *(["--lora-experts"] if opts.kt else []),
    )
    wall = time.monotonic() - started
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event"')]
    progress = [e["progress"] for e in events if e["event"] == "progress"]
    losses = [
        r["loss"] for r in map(json.loads, (output / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r
    ]
    # LLaMA-Factory's own line saying where it trained ("... device: cuda:0, ... compute dtype: ...").
    where = next((line.split("] ")[-1] for line in (proc.stdout + proc.stderr).splitlines() if "device:" in line), "")
    adapter = next(e for e in events if e["event"] == "adapter")
    results = json.loads((output / "all_results.json").read_text())
    # The published adapter as SGLang will read it (per-expert keys cannot go back onto
    # transformers' fused experts through PEFT, so the KTransformers run is judged by its keys).
    with Reader(Path(adapter["path"]) / "adapter_model.safetensors") as reader:
        keys = list(reader.tensors)
    effect = None if opts.kt else float(run(str(TINY), "effect", str(model), adapter["path"]).stdout.strip())
    logs = (proc.stdout + proc.stderr).splitlines()
    kt_says = [line.split("] ")[-1] for line in logs if "backend" in line.lower() and "kt" in line.lower()]
    summary = {
        **info,
        "size": opts.size,
        "processes": processes,
        "trainer_says": where,
        "steps": progress[-1]["step"],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "progress_reports": len(progress),
        "status_tokens_per_second": progress[-1].get("tokensPerSecond"),
        "trainer_runtime_s": results.get("train_runtime"),
        "trainer_samples_per_second": results.get("train_samples_per_second"),
        "wall_s_including_load": round(wall, 1),
        "adapter_rank": adapter["rank"],
        "adapter_expert_lora": adapter.get("expertLora"),
        "output_files": sorted(p.name for p in output.iterdir() if p.is_file()),
        "adapter_sha256": adapter["sha256"],
        "adapter_max_logit_change": effect,
        "adapter_tensors": len(keys),
        "adapter_expert_tensors": sum(".experts." in key for key in keys),
        "kt_log": kt_says[:3],
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if opts.summary:
        opts.summary.write_text(text + "\n")
    changed = effect > 0 if effect is not None else summary["adapter_expert_tensors"] > 0
    return 0 if changed and summary["status_tokens_per_second"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
