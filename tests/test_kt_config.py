"""The production configuration (use_kt on) as LLaMA-Factory 0.9.5 parses it with the KTransformers
stack the trainer image installs: kt-kernel 0.7.2, transformers-kt and accelerate-kt over
LLaMA-Factory's own transformers/accelerate (torch 2.9.1)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from kimi_operator.api.finetunejob import FineTuneJobSpec
from kimi_operator.render import llamafactory

OPERATOR = Path(__file__).parents[1] / "operator"
PARSE = """
import json, os, sys
from kimi_operator.workloads.train import command as train
args = json.load(open(sys.argv[1]))
args["bf16"] = False  # this machine has no GPU; everything else is what the pod gets
if sys.argv[2] == "prepared":
    train.prepare_kt_environment(args)
train.register_template()
from llamafactory.hparams import get_train_args
model, data, training, finetuning, _ = get_train_args(args)
kt = getattr(training, "hf_kt_config", None)
print(json.dumps({
    "use_kt": model.use_kt,
    "template": data.template,
    "use_reentrant_gc": model.use_reentrant_gc,
    "kt": type(kt).__name__,
    "kt_config": getattr(kt, "_kt_config", None),
    "env": {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_KT_")},
}))
"""


def parse(kt_python: str, tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    spec = FineTuneJobSpec.model_validate({"model": {"name": "kimi"}, "dataset": {"hostPath": {"path": "/d/t.jsonl"}}})
    args = llamafactory.train_args(spec, model_path=str(tmp_path), dataset_dir=str(tmp_path), output_dir=str(tmp_path))
    (tmp_path / "args.json").write_text(json.dumps(args))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["PYTHONPATH"] = str(OPERATOR)
    return subprocess.run(
        [kt_python, "-c", PARSE, str(tmp_path / "args.json"), mode],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=600,
    )


def test_the_rendered_kt_configuration_parses_and_configures_kt(kt_python: str, tmp_path: Path) -> None:
    proc = parse(kt_python, tmp_path, "prepared")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["use_kt"] is True
    assert result["template"] == "kimi_k25"
    # kt-kernel's expert recomputation needs non-reentrant checkpointing (the first backward pass
    # fails otherwise, as a CUDA run showed).
    assert result["use_reentrant_gc"] is False
    # transformers-kt built its KT configuration and LLaMA-Factory filled it from the rendered keys.
    assert result["kt"] == "HfTrainerKTConfig"
    config = result["kt_config"]
    assert (config["kt_lora_rank"], config["kt_lora_alpha"], config["kt_model_max_length"]) == (16, 32, 4096)
    assert config["kt_use_lora_experts"] is False
    assert result["env"]["ACCELERATE_KT_LORA_RANK"] == "16"


def test_without_accelerate_use_kt_the_backend_would_be_silently_off(kt_python: str, tmp_path: Path) -> None:
    # What a pod that only ran LLaMA-Factory in-process would get: use_kt parsed, no KT configuration.
    proc = parse(kt_python, tmp_path, "bare")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["use_kt"] is True
    assert result["kt"] == "NoneType"
