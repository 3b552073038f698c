"""LoraServer: SGLang (+kt-kernel) replicas of a KimiModel serving LoRA adapters behind a router."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from kimi_operator.api.base import AbsolutePath, ApiModel, ObjectRef, Quantity, SecretKeyRef, cel
from kimi_operator.api.common_status import BaseStatus

KIND = "LoraServer"
PLURAL = "loraservers"
SHORT_NAMES = ("lsrv",)

# Adapter names appear in the OpenAI "model" field as "<served>:<adapter>", so no ':' or '/'.
AdapterName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")]
KtMethod = Literal["AMXINT4", "AMXINT8", "RAWINT4", "FP8", "FP8_PERCHANNEL", "BF16", "LLAMAFILE"]


class Adapter(ApiModel):
    """One adapter to serve: the output of a FineTuneJob, or a PEFT directory on the nodes."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.fineTuneJob), has(self.path)].exists_one(x, x)",
                    "exactly one of fineTuneJob or path must be set",
                )
            ]
        }
    )

    name: AdapterName = Field(description="Adapter name; clients select it with model `<servedModelName>:<name>`.")
    fine_tune_job: ObjectRef | None = Field(default=None, description="FineTuneJob whose exported adapter is served.")
    path: AbsolutePath | None = Field(default=None, description="PEFT adapter directory present on the serving nodes.")
    pinned: bool = Field(default=False, description="Keep the adapter loaded; never evict it.")


class Engine(ApiModel):
    """SGLang and kt-kernel settings."""

    kt_method: KtMethod = Field(default="AMXINT8", description="kt-kernel CPU expert method (--kt-method).")
    kt_cpuinfer: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None, description="CPU inference threads, usually the physical cores (--kt-cpuinfer)."
    )
    kt_threadpool_count: Annotated[int, Field(ge=1, le=16)] = Field(
        default=1, description="Thread pools, usually the NUMA nodes (--kt-threadpool-count)."
    )
    kt_num_gpu_experts: Annotated[int, Field(ge=0, le=384)] = Field(
        default=0, description="Routed experts kept on the GPU (--kt-num-gpu-experts)."
    )
    kt_gpu_prefill_token_threshold: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Prefill on GPU above this many tokens; RAWINT4 and FP8 methods only."
    )
    tensor_parallel_size: Annotated[int, Field(ge=1, le=16)] = Field(default=1, description="GPUs per replica (--tp).")
    context_length: Annotated[int, Field(ge=256, le=262144)] | None = Field(
        default=None, description="Maximum context length (--context-length)."
    )
    max_running_requests: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=16, description="Concurrent requests per replica (--max-running-requests)."
    )
    lora_backend: Literal["triton", "csgmv"] = Field(default="csgmv", description="LoRA kernel (--lora-backend).")
    max_loras_per_batch: Annotated[int, Field(ge=1, le=128)] = Field(
        default=8, description="Adapters mixed in one batch (--max-loras-per-batch)."
    )
    max_loaded_loras: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None, description="Adapters kept loaded per replica (--max-loaded-loras)."
    )
    max_lora_rank: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=64, description="Largest adapter rank that can be loaded at run time (--max-lora-rank)."
    )
    lora_eviction_policy: Literal["lru", "fifo"] = Field(default="lru", description="--lora-eviction-policy.")
    extra_args: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=64)] = Field(
        default_factory=list, description="Further SGLang arguments, appended verbatim."
    )


class Sampling(ApiModel):
    """Defaults applied by the router when a request leaves them unset."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(default=None, description="Sampling temperature.")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(default=None, description="Nucleus sampling mass.")
    max_tokens: Annotated[int, Field(ge=1, le=262144)] | None = Field(default=None, description="Completion cap.")


class ServeResources(ApiModel):
    """Resources of each engine pod."""

    gpus: Annotated[int, Field(ge=1, le=16)] = Field(default=2, description="nvidia.com/gpu per replica.")
    cpu: Quantity = Field(default="64", description="CPU request and limit; the CPU experts run here.")
    memory: Quantity = Field(default="900Gi", description="Memory request and limit; the CPU experts live here.")
    shared_memory: Quantity = Field(default="32Gi", description="Size of the /dev/shm memory volume.")


class Router(ApiModel):
    """The OpenAI-compatible router in front of the replicas."""

    replicas: Annotated[int, Field(ge=1, le=32)] = Field(default=1, description="Router pods.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key clients must send as a Bearer token."
    )


# Rules that relate several fields of the spec.
_SPEC_RULES: list[Any] = [
    cel(
        "self.adapters.all(a, a.name != self.servedModelName)",
        "an adapter name must differ from servedModelName",
        field_path=".adapters",
    ),
    cel(
        "self.mode != 'MergedExpert' || size(self.adapters) <= 1",
        "MergedExpert mode serves one merged expert adapter per LoraServer",
        field_path=".adapters",
    ),
    cel(
        "self.mode != 'MergedExpert' || self.engine.ktNumGpuExperts == 0",
        "MergedExpert mode needs engine.ktNumGpuExperts 0 (expert LoRA runs on the CPU experts)",
        field_path=".engine.ktNumGpuExperts",
    ),
    cel(
        "self.mode != 'MergedExpert' || self.engine.maxRunningRequests >= 2",
        "MergedExpert mode needs engine.maxRunningRequests of at least 2",
        field_path=".engine.maxRunningRequests",
    ),
]


class LoraServerSpec(ApiModel):
    """Desired state of a LoraServer."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _SPEC_RULES})

    model: ObjectRef = Field(description="KimiModel (same namespace) whose ready nodes serve.")
    served_model_name: Annotated[
        str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    ] = Field(default="kimi-k2.5", description="Base model name clients send in the OpenAI `model` field.")
    mode: Literal["MultiAdapter", "MergedExpert"] = Field(
        default="MultiAdapter",
        description=(
            "MultiAdapter: many attention-only adapters per replica through SGLang's LoRA manager. "
            "MergedExpert: one adapter with expert LoRA merged per replica (KTransformers path)."
        ),
    )
    replicas: Annotated[int, Field(ge=0, le=64)] = Field(default=1, description="Engine replicas.")
    adapters: Annotated[list[Adapter], Field(max_length=256)] = Field(
        default_factory=list,
        description="Adapters to serve; loaded and unloaded at run time as this list changes.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    engine: Engine = Field(
        default_factory=Engine,
        description="SGLang and kt-kernel settings.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.maxLoadedLoras) || self.maxLoadedLoras >= self.maxLorasPerBatch",
                    "maxLoadedLoras must be at least maxLorasPerBatch",
                    field_path=".maxLoadedLoras",
                ),
                cel(
                    "!has(self.ktGpuPrefillTokenThreshold) || self.ktMethod in ['RAWINT4', 'FP8', 'FP8_PERCHANNEL']",
                    "ktGpuPrefillTokenThreshold applies only to the RAWINT4, FP8 and FP8_PERCHANNEL methods",
                    field_path=".ktGpuPrefillTokenThreshold",
                ),
            ]
        },
    )
    sampling: Sampling = Field(default_factory=Sampling, description="Router-side sampling defaults.")
    resources: ServeResources = Field(default_factory=ServeResources, description="Resources of each engine pod.")
    router: Router = Field(default_factory=Router, description="The OpenAI-compatible router.")


class AdapterPlacement(ApiModel):
    """Where one adapter is loaded, as verified against the engines."""

    name: Annotated[str, Field(max_length=63)] = Field(description="Adapter name.")
    state: Literal["Pending", "Loaded", "Failed", "Unloading"] = Field(description="Load state across replicas.")
    replicas: Annotated[list[Annotated[str, Field(max_length=253)]], Field(max_length=64)] = Field(
        default_factory=list, description="Engine pods where the engine lists the adapter as loaded."
    )
    message: Annotated[str, Field(max_length=4096)] | None = Field(default=None, description="Why it failed.")


class LoraServerStatus(BaseStatus):
    """Observed state of a LoraServer."""

    replicas: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Engine pods that exist.")
    ready_replicas: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Engine pods that are ready.")
    adapters: Annotated[list[AdapterPlacement], Field(max_length=256)] = Field(
        default_factory=list,
        description="Per-adapter placement.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    endpoint: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None, description="In-cluster URL of the OpenAI-compatible router."
    )


PRINTER_COLUMNS = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
    {"name": "Mode", "type": "string", "jsonPath": ".spec.mode", "priority": 1},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)
