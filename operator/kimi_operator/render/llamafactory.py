"""LLaMA-Factory 0.9.5 inputs rendered from a FineTuneJob: the training arguments and the dataset
registration. The trainer image registers the Kimi K2.5 chat template under TEMPLATE (LLaMA-Factory
has none: `kimi` does not exist and `kimi_vl`/`deepseek` format turns differently).

KTransformers is driven by 0.9.5's own fields (use_kt, kt_weight_path, kt_use_lora_experts, ...),
not by the stale kt_optimize_rule/cpu_infer/chunk_size of the public guide.
"""

from __future__ import annotations

import json
from typing import Any

from kimi_operator.api.finetunejob import DATASET_INFO_FILE, FineTuneJobSpec

DATASET_NAME = "kimi_sft"
TEMPLATE = "kimi_k25"
ACCELERATE_CONFIG = "accelerate.yaml"


def train_args(spec: FineTuneJobSpec, *, model_path: str, dataset_dir: str, output_dir: str) -> dict[str, Any]:
    """The argument dict LLaMA-Factory's parser takes (also written as YAML for `llamafactory-cli`)."""
    t, lora = spec.training, spec.lora
    return {
        "model_name_or_path": model_path,
        "trust_remote_code": True,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "lora_target": ",".join(lora.target_modules),
        "dataset": DATASET_NAME,
        "dataset_dir": dataset_dir,
        "template": TEMPLATE,
        # The template is a reasoning template: this switch keeps or drops the thinking section.
        "enable_thinking": t.thinking,
        "cutoff_len": t.cutoff_len,
        "output_dir": output_dir,
        # Never wipe the output directory: it holds the checkpoints a retried pod resumes from (with
        # this false, LLaMA-Factory resumes from the last checkpoint there by itself).
        "overwrite_output_dir": False,
        "logging_steps": t.logging_steps,
        "save_steps": t.save_steps,
        "per_device_train_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "num_train_epochs": float(t.epochs),
        "lr_scheduler_type": "cosine",
        "warmup_ratio": t.warmup_ratio,
        "bf16": True,
        # kt-kernel recomputes its expert activations inside torch's non-reentrant checkpointing
        # (its own context_fn); LLaMA-Factory's default, reentrant, stops KT training at the first
        # backward pass ("activation_policy.gpu=recompute requires non-reentrant gradient checkpointing").
        "use_reentrant_gc": False,
        "report_to": "none",
        # Count the real (non-padding) input tokens: the trainer log then carries total_tokens and
        # throughput, which become status.progress.tokensPerSecond.
        "include_num_input_tokens_seen": "non_padding",
        "use_kt": True,
        # kt-kernel trains LoRA on the routed experts whenever use_kt is on (fused expert LoRA);
        # lora.experts decides at export whether it is published. kt_use_lora_experts is another
        # feature (extra GPU-side experts) that kt-kernel's SGLang converter does not carry.
        "kt_use_lora_experts": False,
    }


def dataset_info(*, file_name: str) -> dict[str, Any]:
    """Registration of the records as an OpenAI-style messages dataset. The training pod writes them
    under ``messages`` whatever key the source file uses (spec.dataset.messagesKey, or detected)."""
    return {
        DATASET_NAME: {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }


def config_files(
    spec: FineTuneJobSpec, *, model_path: str, dataset_file: str, output_dir: str, config_dir: str
) -> dict[str, str]:
    """ConfigMap data: the training arguments and the dataset registration, as JSON (valid YAML)."""
    args = train_args(spec, model_path=model_path, dataset_dir=config_dir, output_dir=output_dir)
    files = {
        "train.yaml": json.dumps(args, indent=2, sort_keys=True) + "\n",
        DATASET_INFO_FILE: json.dumps(dataset_info(file_name=dataset_file), indent=2) + "\n",
    }
    if spec.resources.gpus > 1:
        files[ACCELERATE_CONFIG] = json.dumps(accelerate_config(spec.resources.gpus), indent=2, sort_keys=True) + "\n"
    return files


def accelerate_config(processes: int) -> dict[str, Any]:
    """``accelerate launch``'s configuration for one training process per GPU of the pod.

    FSDP2, because accelerate-kt takes several processes with the KTransformers backend only under
    FSDP2 (kt-kernel's CPU experts live in rank 0, which serves the other ranks' tokens), and the
    same for plain LoRA so both backends shard alike. The settings are KTransformers' own FSDP2
    examples'; the KT settings stay in the training arguments (accelerate-kt refuses a kt_config
    section here).
    """
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
        },
        "mixed_precision": "bf16",
        "machine_rank": 0,
        "num_machines": 1,
        "num_processes": processes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
