"""FineTuneJob: a LoRA SFT run of a KimiModel on a validated dataset, exported for serving."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from kimi_operator.api.base import (
    AbsolutePath,
    ApiModel,
    ObjectName,
    ObjectRef,
    PodMetadata,
    Quantity,
    SecretKeyRef,
    cel,
    immutable,
)
from kimi_operator.api.common_status import BaseStatus

KIND = "FineTuneJob"
PLURAL = "finetunejobs"
# The directory under a training pod's output directory that the exported adapter is renamed to
# once complete: where the training pod writes it and where the LoraServers read it.
EXPORTED_ADAPTER_DIR = "adapter"
# LLaMA-Factory's dataset registry, which the operator renders and the training pod completes.
DATASET_INFO_FILE = "dataset_info.json"
SHORT_NAMES = ("ftj",)

RelativePath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^/\x00][^\x00]*$")]


class ConfigMapDataset(ApiModel):
    """A small dataset stored in a ConfigMap key (JSON lines)."""

    name: ObjectName = Field(description="ConfigMap in the same namespace.")
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = Field(
        description="Key holding the JSON-lines records."
    )


class PvcDataset(ApiModel):
    """A dataset file on a PersistentVolumeClaim."""

    claim_name: ObjectName = Field(description="PersistentVolumeClaim in the same namespace.")
    path: RelativePath = Field(description="Path of the JSON-lines file, relative to the volume root.")


class HostPathDataset(ApiModel):
    """A dataset file already on the training node."""

    path: AbsolutePath = Field(description="Absolute path of the JSON-lines file on the node.")


class HuggingFaceDataset(ApiModel):
    """A dataset repository on the hub, pinned to one revision."""

    repo: Annotated[
        str,
        Field(min_length=3, max_length=200, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*$"),
    ] = Field(description="Dataset repository id, owner/name.")
    revision: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\s]+$")] = Field(
        description="Commit sha (recommended) or tag to download."
    )
    path: RelativePath = Field(description="JSON-lines file within the repository.")
    token_secret_ref: SecretKeyRef | None = Field(default=None, description="Secret key holding a hub token.")


class Dataset(ApiModel):
    """Exactly one source of OpenAI-style chat records, and how they are keyed."""

    config_map: ConfigMapDataset | None = Field(default=None, description="Records in a ConfigMap key.")
    persistent_volume_claim: PvcDataset | None = Field(default=None, description="Records on a PVC.")
    host_path: HostPathDataset | None = Field(default=None, description="Records on the node.")
    hugging_face: HuggingFaceDataset | None = Field(default=None, description="Records on the hub.")
    messages_key: Literal["conversations", "messages"] | None = Field(
        default=None,
        description=(
            "Key of each record holding the list of {role, content} messages. Detected from the records "
            "when not set; a file that mixes the two keys is refused."
        ),
    )


class LoraSpec(ApiModel):
    """LoRA settings; defaults follow the public fine-tuning guide."""

    rank: Annotated[int, Field(ge=1, le=1024)] = Field(default=16, description="LoRA rank r.")
    alpha: Annotated[int, Field(ge=1, le=4096)] = Field(default=32, description="LoRA alpha; scaling is alpha/r.")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(default=0.1, description="LoRA dropout probability.")
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]], Field(min_length=1, max_length=32)
    ] = Field(
        default_factory=lambda: ["all"],
        description="Modules that get adapters; `all` lets the trainer choose every linear layer.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    experts: bool = Field(
        default=False,
        description=(
            "Publish the LoRA of the routed experts too (KTransformers fused expert LoRA, converted to "
            "per-expert PEFT keys and merged with the rest). A LoraServer serves such an adapter on "
            "replicas of its own (sglang-kt loads expert LoRA only at start); without it only the "
            "non-expert part is published, which shares replicas with the base model."
        ),
    )


class Training(ApiModel):
    """Optimisation settings; defaults follow the public fine-tuning guide."""

    epochs: Annotated[float, Field(gt=0, le=1000)] = Field(default=3, description="Training epochs.")
    learning_rate: Annotated[float, Field(gt=0, le=1)] = Field(default=2e-5, description="Peak learning rate.")
    per_device_batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=1, description="Micro-batch size per device."
    )
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=16, description="Micro-batches accumulated per optimiser step."
    )
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.1, description="Fraction of steps spent warming up the learning rate."
    )
    cutoff_len: Annotated[int, Field(ge=16, le=262144)] = Field(
        default=4096, description="Maximum tokens per example; longer examples are truncated."
    )
    logging_steps: Annotated[int, Field(ge=1, le=100000)] = Field(
        default=1, description="Optimiser steps between progress records."
    )
    save_steps: Annotated[int, Field(ge=1, le=1000000)] = Field(
        default=100, description="Optimiser steps between checkpoints (resume points)."
    )
    thinking: bool = Field(default=False, description="Render assistant turns with Kimi's thinking section enabled.")


class TrainResources(ApiModel):
    """Resources of the training pod; defaults fit the guide's minimum host (2 GPUs, 1 TiB RAM)."""

    gpus: Annotated[int, Field(ge=1, le=16)] = Field(default=2, description="nvidia.com/gpu to request.")
    cpu: Quantity = Field(default="64", description="CPU request and limit; the CPU experts run here.")
    memory: Quantity = Field(default="900Gi", description="Memory request and limit; the CPU experts live here.")
    shared_memory: Quantity = Field(default="64Gi", description="Size of the /dev/shm memory volume.")


class PublishVolume(ApiModel):
    """A volume every serving node can mount (ReadWriteMany: NFS, CephFS, a cloud file share)."""

    claim_name: ObjectName = Field(description="PersistentVolumeClaim in the same namespace.")


class Publish(ApiModel):
    """Where the exported adapter is copied so that replicas on other nodes can have it."""

    persistent_volume_claim: PublishVolume = Field(
        description=(
            "Copied to <claim>/<namespace>/<adapter name>/<sha256>/ (whole, then renamed); a LoraServer whose "
            "spec.adapterStore names the same claim serves it on any node."
        )
    )


class Output(ApiModel):
    """Where the adapter goes and what happens to it."""

    adapter_name: (
        Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")] | None
    ) = Field(default=None, description="Name of the exported adapter; defaults to the FineTuneJob's name.")
    reclaim_policy: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description="Retain keeps checkpoints and the adapter when the FineTuneJob is deleted.",
    )
    publish: Publish | None = Field(
        default=None,
        description=(
            "Also copy the adapter to a shared volume. Without it the adapter stays on the training node "
            "and only replicas there can load it. Immutable."
        ),
    )


def _same(path: str, why: str) -> dict[str, Any]:
    """``spec.<path>`` may not change, nor be added or removed, once the object exists.

    A rule on the field itself would not fire when it is added or removed (CEL transition rules run
    only where both the old and the new value exist), so it sits on the spec, with every step of the
    path checked by has().
    """
    parts = path.split(".")

    def present(root: str) -> str:
        return " && ".join(f"has({root}.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))

    new, old = present("self"), present("oldSelf")
    return cel(
        f"({new}) == ({old}) && (!({new}) || self.{path} == oldSelf.{path})",
        f"spec.{path} is immutable: {why}; create a new FineTuneJob to change it",
        field_path=f".{path}",
    )


# Everything that reaches the training Job is fixed at creation (a Job's pod template is immutable);
# suspend, queueName and output.reclaimPolicy may change.
_SPEC_RULES: list[Any] = [
    _same("backoffLimit", "it is the training Job's backoffLimit"),
    _same("podMetadata", "it is part of the training pod's template"),
    _same("output.adapterName", "it is an argument of the training pod"),
    _same("output.publish", "the training pod mounts that volume"),
]


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob. Everything but suspend, queueName and output.reclaimPolicy is
    immutable."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _SPEC_RULES})

    model: ObjectRef = Field(
        description="KimiModel (same namespace) whose bf16 variant is trained on. Immutable.",
        json_schema_extra={"x-kubernetes-validations": [immutable("spec.model")]},
    )
    dataset: Dataset = Field(
        description="Training records. Immutable.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.configMap), has(self.persistentVolumeClaim), has(self.hostPath), "
                    "has(self.huggingFace)].exists_one(x, x)",
                    "exactly one of configMap, persistentVolumeClaim, hostPath or huggingFace must be set",
                ),
                immutable("spec.dataset"),
            ]
        },
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec,
        description="LoRA settings. Immutable.",
        json_schema_extra={"x-kubernetes-validations": [immutable("spec.lora")]},
    )
    training: Training = Field(
        default_factory=Training,
        description="Optimisation settings. Immutable.",
        json_schema_extra={
            "x-kubernetes-validations": [
                immutable("spec.training"),
                cel(
                    "self.saveSteps >= self.loggingSteps",
                    "saveSteps must be at least loggingSteps",
                    field_path=".saveSteps",
                ),
            ]
        },
    )
    resources: TrainResources = Field(
        default_factory=TrainResources,
        description="Resources of the training pod. Immutable.",
        json_schema_extra={"x-kubernetes-validations": [immutable("spec.resources")]},
    )
    output: Output = Field(default_factory=Output, description="Adapter export.")
    suspend: bool = Field(
        default=False,
        description=(
            "Hold the training Job without running it. With queueName, Kueue decides when the Job runs "
            "and this applies only when the Job is created."
        ),
    )
    queue_name: (
        Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")] | None
    ) = Field(default=None, description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label on the Job.")
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = Field(
        default=3,
        description="Retries after crashes or node loss (config and data errors are not retried). Immutable.",
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Labels and annotations for the training pod. Immutable."
    )


class Progress(ApiModel):
    """Training progress as reported by the pod."""

    step: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Current optimiser step.")
    total_steps: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Total optimiser steps.")
    percent: Annotated[float, Field(ge=0, le=100)] | None = Field(default=None, description="Percent complete.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    learning_rate: float | None = Field(default=None, description="Latest learning rate.")
    epoch: float | None = Field(default=None, description="Current epoch (fractional).")
    tokens_per_second: float | None = Field(default=None, description="Training throughput.")
    eta: Annotated[str, Field(max_length=32)] | None = Field(default=None, description="Estimated time left (H:MM:SS).")
    last_update_time: Annotated[str, Field(max_length=64)] | None = Field(
        default=None,
        description="When the pod last reported (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )


class PublishedAdapter(ApiModel):
    """Where the adapter was copied."""

    claim_name: Annotated[str, Field(max_length=253)] = Field(description="PersistentVolumeClaim holding it.")
    path: Annotated[str, Field(max_length=4096)] = Field(
        description="Directory of the adapter, relative to the volume."
    )


class AdapterStatus(ApiModel):
    """The exported adapter."""

    name: Annotated[str, Field(max_length=63)] = Field(description="Adapter name.")
    node: Annotated[str, Field(max_length=253)] = Field(description="Node holding the adapter files.")
    path: Annotated[str, Field(max_length=4096)] = Field(description="Directory of the SGLang-ready adapter.")
    size_bytes: Annotated[int, Field(ge=0)] = Field(description="Total size of the adapter files.")
    sha256: Annotated[str, Field(max_length=64)] = Field(description="sha256 of adapter_model.safetensors.")
    base_model: Annotated[str, Field(max_length=253)] = Field(description="KimiModel the adapter was trained on.")
    rank: Annotated[int, Field(ge=1)] = Field(description="LoRA rank.")
    expert_lora: bool = Field(default=False, description="The adapter carries LoRA of the routed experts.")
    llamacpp_dropped_modules: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=64)] | None = (
        Field(
            default=None,
            description=(
                "Trained modules a llama.cpp server would not apply (by their last name; experts for the "
                "routed experts): the MLA projections q_a_proj, q_b_proj and kv_a_proj_with_mqa are loaded "
                "without effect, kv_b_proj cannot be converted. Empty: llama.cpp applies all of it."
            ),
        )
    )
    gguf_sha256: Annotated[str, Field(max_length=64)] | None = Field(
        default=None,
        description=(
            "sha256 of adapter.gguf, the adapter converted for llama.cpp beside the PEFT files (only the "
            "modules llama.cpp applies; llamacppDroppedModules names the others)."
        ),
    )
    gguf_error: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None, description="Why no adapter.gguf was written (a llama.cpp LoraServer cannot serve it)."
    )
    published: PublishedAdapter | None = Field(
        default=None, description="The copy on the shared volume of spec.output.publish."
    )
    publish_error: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None,
        description="Why the copy to spec.output.publish failed; the adapter is then on its node only.",
    )


class FineTuneJobStatus(BaseStatus):
    """Observed state of a FineTuneJob."""

    progress: Progress | None = Field(default=None, description="Latest progress reported by the training pod.")
    attempts: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Training pods started so far.")
    latest_checkpoint: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None, description="Newest complete checkpoint directory."
    )
    node: Annotated[str, Field(max_length=253)] | None = Field(default=None, description="Node the job runs on.")
    adapter: AdapterStatus | None = Field(default=None, description="The exported adapter, once training succeeded.")


PRINTER_COLUMNS = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "format": "float"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "format": "float"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.progress.tokensPerSecond", "priority": 1},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)
