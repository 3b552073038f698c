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
from kimi_operator.workloads.train import trainer
args = json.load(open(sys.argv[1]))
args["bf16"] = False  # this machine has no GPU; everything else is what the pod gets
if sys.argv[2] == "prepared":
    trainer.prepare_kt_environment(args)
trainer.register_template()
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


ACCELERATE = """
import json, sys
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from accelerate.utils.dataclasses import KTransformersPlugin
config = load_config_from_file(sys.argv[1])
plugin = KTransformersPlugin(enabled=True)
# What accelerate-kt checks when a KT run starts in several processes.
plugin.validate_distributed_setup(
    config.distributed_type,
    is_fsdp2=int(config.fsdp_config.get("fsdp_version", 1)) == 2,
    num_processes=config.num_processes,
)
print(json.dumps({"type": str(config.distributed_type), "processes": config.num_processes,
                  "fsdp_version": config.fsdp_config["fsdp_version"]}))
"""


def test_the_rendered_launch_configuration_is_one_accelerate_kt_accepts(kt_python: str, tmp_path: Path) -> None:
    """The FineTuneJob's default two GPUs run one process each under FSDP2: accelerate-kt's own
    config loader reads the rendered file (it refuses unknown keys, such as a kt_config section)
    and its KT plugin accepts that layout (several processes without FSDP2 it refuses)."""
    spec = FineTuneJobSpec.model_validate({"model": {"name": "kimi"}, "dataset": {"hostPath": {"path": "/d/t.jsonl"}}})
    files = llamafactory.config_files(
        spec, model_path="/m", dataset_file="/o/dataset.jsonl", output_dir="/o", config_dir=str(tmp_path)
    )
    path = tmp_path / "accelerate.yaml"

    def load(text: str) -> subprocess.CompletedProcess[str]:
        path.write_text(text)
        env = {**os.environ, "PYTHONPATH": str(OPERATOR)}
        return subprocess.run(
            [kt_python, "-c", ACCELERATE, str(path)], capture_output=True, text=True, check=False, env=env, timeout=600
        )

    proc = load(files["accelerate.yaml"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"type": "DistributedType.FSDP", "processes": 2, "fsdp_version": 2}
    # The oracle refuses what upstream's older examples put there.
    refused = load(json.dumps({**json.loads(files["accelerate.yaml"]), "kt_config": {}}))
    assert refused.returncode != 0
    assert "kt_config" in refused.stderr
