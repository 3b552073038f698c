"""LoraServer: SGLang (+kt-kernel) replicas of a KimiModel serving LoRA adapters behind a router."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from kimi_operator.api.base import AbsolutePath, ApiModel, ObjectRef, PodMetadata, Quantity, SecretKeyRef, cel
from kimi_operator.api.common_status import BaseStatus

KIND = "LoraServer"
PLURAL = "loraservers"
SHORT_NAMES = ("lsrv",)

# Adapter names appear in the OpenAI "model" field as "<served>:<adapter>", so no ':' or '/'.
AdapterName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")]
# The kt-kernel methods whose expert weights a KimiModel prepares (api.kimimodel.Variant): AMXINT8 ->
# cpu-int8, AMXINT4 -> cpu-int4, RAWINT4 -> native-int4 (the checkpoint as shipped), BF16 -> bf16.
KtMethod = Literal["AMXINT4", "AMXINT8", "RAWINT4", "BF16"]


# Flags rendered from the spec (render/sglang.py), or that would break what the operator relies on
# (the probes' and the agent's address, run-time LoRA loading which needs one data-parallel rank).
RESERVED_FLAGS = (
    "--model-path",
    "--served-model-name",
    "--host",
    "--port",
    "--tp-size",
    "--tensor-parallel-size",
    "--dp-size",
    "--data-parallel-size",
    "--pp-size",
    "--kt-method",
    "--kt-weight-path",
    "--kt-num-gpu-experts",
    "--kt-gpu-prefill-token-threshold",
    "--enable-lora",
    "--lora-paths",
    "--max-lora-rank",
    "--lora-target-modules",
    "--max-loras-per-batch",
    "--max-loaded-loras",
    "--lora-backend",
    "--max-running-requests",
)


class AdapterStore(ApiModel):
    """The shared volume adapters are published to."""

    persistent_volume_claim: ObjectRef = Field(
        description="PersistentVolumeClaim (ReadWriteMany) in the same namespace."
    )


class AdapterCache(ApiModel):
    """The node-local copies of this LoraServer's adapters (under the KimiModel's storage, shared by
    every LoraServer on the node, keyed by sha256)."""

    reclaim_policy: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description=(
            "Delete: when the LoraServer is deleted, its adapters' copies are removed from the nodes of its "
            "KimiModel, except those another LoraServer serves. Retain: kept (a later server starts faster)."
        ),
    )


class HubAdapter(ApiModel):
    """A PEFT adapter in a hub repository, pinned to one revision."""

    repo: Annotated[
        str,
        Field(min_length=3, max_length=200, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*$"),
    ] = Field(description="Repository id, owner/name.")
    revision: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\s]+$")] = Field(
        description="Commit sha (recommended) or tag to download."
    )
    subfolder: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^/\x00][^\x00]*$")] | None = Field(
        default=None, description="Directory of the adapter within the repository; the root when unset."
    )
    endpoint: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^\s]+$")] | None = Field(
        default=None, description="Hub endpoint, for a mirror; defaults to the public hub."
    )


class Adapter(ApiModel):
    """One adapter to serve, from exactly one source.

    Shared adapters (attention-only LoRA) are loaded at run time on the shared replicas, beside the
    base model. An expert adapter (LoRA of the routed experts, from a FineTuneJob with
    ``lora.experts: true``) can only be served by an engine of its own that loads it at start and
    applies it to every request (sglang-kt's rule): it gets ``dedicatedReplicas`` replicas of its own.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.fineTuneJob), has(self.path), has(self.huggingFace)].exists_one(x, x)",
                    "exactly one of fineTuneJob, path or huggingFace must be set",
                ),
                cel(
                    "!has(self.fineTuneJob) || !has(self.expert)",
                    "expert is known from the FineTuneJob's exported adapter; set it only for path and "
                    "huggingFace sources",
                    field_path=".expert",
                ),
                cel(
                    "!has(self.fineTuneJob) || !has(self.sha256)",
                    "sha256 is known from the FineTuneJob's exported adapter; set it only for path and "
                    "huggingFace sources",
                    field_path=".sha256",
                ),
                cel(
                    "!(has(self.expert) && self.expert && has(self.pinned) && self.pinned)",
                    "an expert adapter has replicas of its own and is never evicted: pinned applies to "
                    "shared adapters only",
                    field_path=".pinned",
                ),
                cel(
                    "!has(self.dedicatedReplicas) || (has(self.expert) && self.expert) || has(self.fineTuneJob)",
                    "dedicatedReplicas applies to expert adapters only",
                    field_path=".dedicatedReplicas",
                ),
                cel(
                    "!(has(self.expert) && self.expert) || has(self.sha256)",
                    "an expert adapter's engine starts from its files in the node cache, found by their sha256: "
                    "set sha256",
                    field_path=".sha256",
                ),
            ]
        }
    )

    name: AdapterName = Field(
        description="Adapter name; clients select it with model `<servedModelName>:<name>` (or the bare name)."
    )
    fine_tune_job: ObjectRef | None = Field(
        default=None,
        description=(
            "FineTuneJob (same namespace) whose exported adapter is served; it is loaded when the job "
            "succeeds and replaced on every replica, without a restart, when a newer export appears."
        ),
    )
    path: AbsolutePath | None = Field(
        default=None, description="PEFT adapter directory present at this path on the serving nodes."
    )
    hugging_face: HubAdapter | None = Field(default=None, description="PEFT adapter in a hub repository.")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        default=None,
        description=(
            "Expected sha256 of adapter_model.safetensors (path and huggingFace sources); the files are "
            "checked against it before any engine sees them."
        ),
    )
    expert: bool | None = Field(
        default=None,
        description=(
            "The adapter carries LoRA of the routed experts (path and huggingFace sources; a FineTuneJob "
            "says so itself). Expert adapters are served on dedicated replicas."
        ),
    )
    dedicated_replicas: Annotated[int, Field(ge=1, le=16)] | None = Field(
        default=None, description="Replicas of its own for an expert adapter (default 1)."
    )
    pinned: bool = Field(default=False, description="Shared adapters: load on every shared replica and never evict it.")
    accept_dropped_modules: bool = Field(
        default=False,
        description=(
            "engine.type llamacpp: serve this adapter although llama.cpp would not apply some of its trained "
            "modules (a FineTuneJob's export names them; status.adapters[].llamacppDroppedModules repeats them). "
            "Without it such an adapter is refused."
        ),
    )


class LlamaCpp(ApiModel):
    """llama-server settings (engine.type llamacpp): the GGUF quantization the KimiModel prepares
    (its gguf variant), on hosts with less RAM than the INT4 checkpoint needs."""

    context_size: Annotated[int, Field(ge=256, le=262144)] = Field(
        default=16384,
        description="Context of each request: every parallel slot gets this much (-c is this times parallel).",
    )
    parallel: Annotated[int, Field(ge=1, le=256)] = Field(default=4, description="Requests decoded at once (-np).")
    threads: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None,
        description="CPU threads (-t); default the pod's CPU limit (llama.cpp alone would count the host's cores).",
    )
    gpu_layers: Annotated[int, Field(ge=0, le=999)] = Field(
        default=999, description="Layers offloaded to the GPUs (-ngl); the routed experts stay in RAM (cpuMoeLayers)."
    )
    cpu_moe_layers: Annotated[int, Field(ge=0, le=1024)] | None = Field(
        default=None,
        description=(
            "Keep the routed experts of the first N layers in RAM (--n-cpu-moe); default every layer's (--cpu-moe)."
        ),
    )


class Engine(ApiModel):
    """The engine of every replica: SGLang with kt-kernel (type sglang, the settings below), or
    llama.cpp's llama-server (type llamacpp, its settings under llamacpp)."""

    # Its rules are on LoraServerSpec.engine: the field's own validations replace the class's.

    type: Literal["sglang", "llamacpp"] = Field(
        default="sglang",
        description=(
            "sglang: SGLang with kt-kernel, adapters loaded and unloaded at run time. llamacpp: llama-server on "
            "the KimiModel's gguf variant; it loads adapters only at start, so a change of the adapter list "
            "restarts the replicas one at a time."
        ),
    )
    llamacpp: LlamaCpp | None = Field(default=None, description="llama-server settings (type llamacpp).")

    kt_method: KtMethod = Field(
        default="AMXINT8",
        description=(
            "kt-kernel CPU expert method (--kt-method); the KimiModel must prepare its variant: AMXINT8 "
            "cpu-int8, AMXINT4 cpu-int4, RAWINT4 native-int4, BF16 bf16."
        ),
    )
    kt_cpuinfer: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None, description="CPU inference threads, usually the physical cores (--kt-cpuinfer)."
    )
    kt_threadpool_count: Annotated[int, Field(ge=1, le=16)] = Field(
        default=1, description="Thread pools, usually the NUMA nodes (--kt-threadpool-count)."
    )
    kt_num_gpu_experts: Annotated[int, Field(ge=0, le=384)] = Field(
        default=0,
        description="Routed experts kept on the GPU per layer (--kt-num-gpu-experts); 0 on expert-adapter replicas.",
    )
    kt_gpu_prefill_token_threshold: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description=("Prefill on GPU above this many tokens (RAWINT4 only); not rendered on expert-adapter replicas."),
    )
    tensor_parallel_size: Annotated[int, Field(ge=1, le=16)] = Field(default=1, description="GPUs per replica (--tp).")
    context_length: Annotated[int, Field(ge=256, le=262144)] | None = Field(
        default=None, description="Maximum context length (--context-length)."
    )
    max_running_requests: Annotated[int, Field(ge=2, le=4096)] = Field(
        default=16,
        description="Concurrent requests per replica (--max-running-requests); sglang-kt's expert LoRA needs 2+.",
    )
    lora_backend: Literal["triton", "csgmv", "torch_native"] = Field(
        default="csgmv", description="LoRA kernel (--lora-backend)."
    )
    max_loras_per_batch: Annotated[int, Field(ge=2, le=128)] = Field(
        default=8, description="Adapters mixed in one batch, the base model's slot included (--max-loras-per-batch)."
    )
    max_loaded_loras: Annotated[int, Field(ge=2, le=1024)] | None = Field(
        default=None,
        description=(
            "Adapters kept loaded per shared replica (--max-loaded-loras; default maxLorasPerBatch). When "
            "the shared adapters do not all fit, each is placed on placement.replicasPerAdapter replicas."
        ),
    )
    max_lora_rank: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=64, description="Largest adapter rank that can be loaded at run time (--max-lora-rank)."
    )
    lora_target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z_][a-z0-9_]*$")]],
        Field(min_length=1, max_length=32),
    ] = Field(
        default_factory=lambda: ["all"],
        description=(
            "Modules adapters may target (--lora-target-modules), fixed at start so adapters can load "
            "later; `all` is every module SGLang supports for the model."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    lora_eviction_policy: Literal["lru", "fifo"] = Field(default="lru", description="--lora-eviction-policy.")
    extra_args: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=64)] = Field(
        default_factory=list, description="Further SGLang arguments, appended verbatim."
    )


class Sampling(ApiModel):
    """Defaults the router adds to a request that leaves them out (a field the client sends, even
    null, is the client's). Kimi K2.5's recommended thinking-mode sampling is temperature 1.0, topP
    0.95, minP 0.01."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(default=None, description="Sampling temperature.")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(default=None, description="Nucleus sampling mass.")
    min_p: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="Minimum token probability relative to the most likely one (SGLang's min_p)."
    )
    max_tokens: Annotated[int, Field(ge=1, le=262144)] | None = Field(default=None, description="Completion cap.")


class ServeResources(ApiModel):
    """Resources of each engine pod."""

    gpus: Annotated[int, Field(ge=1, le=16)] = Field(default=2, description="nvidia.com/gpu per replica.")
    cpu: Quantity = Field(default="64", description="CPU request and limit; the CPU experts run here.")
    memory: Quantity = Field(default="900Gi", description="Memory request and limit; the CPU experts live here.")
    shared_memory: Quantity = Field(default="32Gi", description="Size of the /dev/shm memory volume.")


# A model a key may use: the servedModelName, an adapter name, or "*" for all of them.
KeyModel = Annotated[
    str, Field(min_length=1, max_length=63, pattern=r"^(\*|[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
]


class ApiKey(ApiModel):
    """One API key clients send as ``Authorization: Bearer <key>``, and the models it may use."""

    id: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")] = Field(
        description="Names the key in metrics and logs (the key itself never appears there)."
    )
    secret_key_ref: SecretKeyRef = Field(
        description=(
            "Secret key holding the key. The router pods mount the Secret: a changed value takes effect "
            "without a restart (once the kubelet has refreshed the mount, about a minute)."
        )
    )
    models: Annotated[list[KeyModel], Field(min_length=1, max_length=256)] = Field(
        description="What the key may use: servedModelName for the base model, adapter names, or `*` for all.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )


class RouterResources(ApiModel):
    """Requests and limits (equal) of each router pod."""

    cpu: Quantity = Field(default="2", description="CPU of each router pod.")
    memory: Quantity = Field(
        default="1Gi",
        description="Memory of each router pod; leave room for maxBodyBytes times the requests in flight.",
    )


class Router(ApiModel):
    """The OpenAI-compatible router in front of the replicas."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.apiKeySecretRef)",
                    "apiKeySecretRef was replaced by apiKeys (each key with the models it may use)",
                    field_path=".apiKeySecretRef",
                ),
                cel(
                    "self.apiKeys.all(a, self.apiKeys.filter(b, b.secretKeyRef.name == a.secretKeyRef.name && "
                    "b.secretKeyRef.key == a.secretKeyRef.key).size() == 1)",
                    "two apiKeys name the same Secret key: each key needs its own",
                    field_path=".apiKeys",
                ),
            ]
        }
    )

    replicas: Annotated[int, Field(ge=1, le=32)] = Field(default=1, description="Router pods.")
    resources: RouterResources = Field(default_factory=RouterResources, description="Resources of each router pod.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Replaced by apiKeys; refused (kept in the schema so that an old manifest is not silently open).",
    )
    api_keys: Annotated[list[ApiKey], Field(max_length=64)] = Field(
        default_factory=list,
        description="API keys; without any, the endpoint is open to whoever reaches its Service.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["id"]},
    )
    max_body_bytes: Annotated[int, Field(ge=1024, le=268435456)] = Field(
        default=16 * 1024 * 1024, description="Largest request body accepted (413 above)."
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata,
        description="Labels and annotations for the router pods (spec.podMetadata is the engine pods').",
    )


class Placement(ApiModel):
    """How shared adapters are spread over the shared replicas."""

    replicas_per_adapter: Annotated[int, Field(ge=1, le=64)] = Field(
        default=2,
        description=(
            "When the shared adapters do not all fit in engine.maxLoadedLoras, each is loaded on this "
            "many shared replicas, chosen by rendezvous hashing (scaling moves few adapters). Pinned "
            "adapters are on every shared replica."
        ),
    )


# Rules that relate several fields of the spec.
_SPEC_RULES: list[Any] = [
    cel(
        "self.adapters.all(a, a.name != self.servedModelName)",
        "an adapter name must differ from servedModelName",
        field_path=".adapters",
    ),
    cel(
        "self.adapters.filter(a, has(a.pinned) && a.pinned).size() < self.engine.maxLorasPerBatch",
        "at most engine.maxLorasPerBatch - 1 adapters can be pinned (the base model takes a slot)",
        field_path=".adapters",
    ),
    cel(
        "self.engine.type != 'llamacpp' || self.adapters.all(a, !(has(a.expert) && a.expert))",
        "llama.cpp has no replicas of an adapter's own and no routed-expert LoRA: expert adapters need engine.type "
        "sglang (a FineTuneJob's expert adapter can be served without its experts with acceptDroppedModules)",
        field_path=".adapters",
    ),
    cel(
        "self.engine.type != 'llamacpp' || self.adapters.all(a, has(a.fineTuneJob) || has(a.sha256))",
        "with engine.type llamacpp every path or huggingFace adapter needs sha256: llama-server starts with its "
        "adapter.gguf from the node cache, found by that digest",
        field_path=".adapters",
    ),
    cel(
        "self.adapters.filter(a, has(a.pinned) && a.pinned).size() <= "
        "(has(self.engine.maxLoadedLoras) ? self.engine.maxLoadedLoras : self.engine.maxLorasPerBatch)",
        "more pinned adapters than a replica keeps loaded (engine.maxLoadedLoras)",
        field_path=".adapters",
    ),
]


class LoraServerSpec(ApiModel):
    """Desired state of a LoraServer: one endpoint for the base model, shared adapters on shared
    replicas, and each expert adapter on dedicated replicas of its own."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _SPEC_RULES})

    model: ObjectRef = Field(description="KimiModel (same namespace) whose ready nodes serve.")
    served_model_name: Annotated[
        str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    ] = Field(default="kimi-k2.5", description="Base model name clients send in the OpenAI `model` field.")
    replicas: Annotated[int, Field(ge=0, le=64)] = Field(
        default=1,
        description="Shared replicas: the base model and the shared adapters. Expert adapters add their own.",
    )
    adapters: Annotated[list[Adapter], Field(max_length=256)] = Field(
        default_factory=list,
        description="Adapters to serve; shared ones are loaded and unloaded at run time as this list changes.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    placement: Placement = Field(default_factory=Placement, description="Spread of shared adapters.")
    engine: Engine = Field(
        default_factory=Engine,
        description=(
            "SGLang and kt-kernel settings, for every replica; expert-adapter replicas render sglang-kt's "
            "restrictions over them (no GPU experts, no GPU prefill threshold, CUDA graphs off). A change "
            "rolls the replicas one at a time."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.llamacpp) || self.type == 'llamacpp'",
                    "engine.llamacpp applies only with engine.type llamacpp",
                    field_path=".llamacpp",
                ),
                cel(
                    "!has(self.maxLoadedLoras) || self.maxLoadedLoras >= self.maxLorasPerBatch",
                    "maxLoadedLoras must be at least maxLorasPerBatch",
                    field_path=".maxLoadedLoras",
                ),
                cel(
                    "!('all' in self.loraTargetModules) || size(self.loraTargetModules) == 1",
                    "`all` must be the only entry of loraTargetModules (SGLang refuses it with others)",
                    field_path=".loraTargetModules",
                ),
                cel(
                    "self.extraArgs.all(a, !("
                    + " || ".join(f"a == '{f}' || a.startsWith('{f}=')" for f in RESERVED_FLAGS)
                    + "))",
                    "extraArgs may not repeat a flag the operator renders from the spec (set the field instead): "
                    + ", ".join(RESERVED_FLAGS),
                    field_path=".extraArgs",
                ),
                cel(
                    "!has(self.ktGpuPrefillTokenThreshold) || self.ktMethod == 'RAWINT4'",
                    "ktGpuPrefillTokenThreshold applies only to the RAWINT4 method",
                    field_path=".ktGpuPrefillTokenThreshold",
                ),
            ]
        },
    )
    sampling: Sampling = Field(default_factory=Sampling, description="Router-side sampling defaults.")
    resources: ServeResources = Field(default_factory=ServeResources, description="Resources of each engine pod.")
    router: Router = Field(default_factory=Router, description="The OpenAI-compatible router.")
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Labels and annotations for the engine pods."
    )
    adapter_store: AdapterStore | None = Field(
        default=None,
        description=(
            "A shared volume FineTuneJobs publish adapters to (their spec.output.publish): engine pods on any "
            "node mount it read-only and load those adapters from it. Without it a FineTuneJob's adapter "
            "reaches only replicas on the node it trained on."
        ),
    )
    adapter_cache: AdapterCache = Field(
        default_factory=AdapterCache, description="What happens to the node copies of the adapters on deletion."
    )
    hub_endpoint: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^\s]+$")] | None = Field(
        default=None,
        description=(
            "The hub hubTokenSecretRef is a token for (default: the public hub). The token is sent to this "
            "endpoint only: a huggingFace adapter naming another endpoint is fetched without it."
        ),
    )
    hub_token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret key holding the hub token the adapter agents use for every huggingFace adapter; given "
            "to the agent containers as an environment variable (a change restarts the engine pods)."
        ),
    )


AdapterState = Literal["Pending", "Loaded", "Failed", "Unavailable"]


class AdapterPlacement(ApiModel):
    """One adapter as the engines report it."""

    name: Annotated[str, Field(max_length=63)] = Field(description="Adapter name.")
    kind: Literal["Shared", "Expert", "Unknown"] = Field(
        description="Shared (loaded at run time beside the base) or Expert (replicas of its own); Unknown "
        "until its source says."
    )
    state: AdapterState = Field(
        description=(
            "Loaded: every replica it is placed on lists it in /v1/models. Pending: not yet everywhere. "
            "Failed: an engine refused it (message has the engine's words). Unavailable: its files cannot "
            "be had (message says where they are and what to do)."
        )
    )
    sha256: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="sha256 of adapter_model.safetensors being served."
    )
    source: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None, description="Where the files come from."
    )
    placed: Annotated[list[Annotated[str, Field(max_length=253)]], Field(max_length=64)] = Field(
        default_factory=list, description="Replicas it is meant to be loaded on."
    )
    replicas: Annotated[list[Annotated[str, Field(max_length=253)]], Field(max_length=64)] = Field(
        default_factory=list, description="Replicas whose engine lists it in /v1/models."
    )
    message: Annotated[str, Field(max_length=4096)] | None = Field(default=None, description="Why, when not Loaded.")
    llamacpp_dropped_modules: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=64)] | None = (
        Field(
            default=None,
            description=(
                "engine.type llamacpp: trained modules this server does not apply (accepted with "
                "acceptDroppedModules), as the FineTuneJob's export named them."
            ),
        )
    )


class AdapterError(ApiModel):
    """An adapter a replica could not serve: refused by its engine, or its files out of reach."""

    name: Annotated[str, Field(max_length=63)] = Field(description="Adapter name.")
    reason: Literal["Refused", "Unavailable", "EngineStuck"] = Field(
        description=(
            "Refused: the engine refused the files (its words). Unavailable: the agent could not get them. "
            "EngineStuck: the engine took an adapter update and never answered; none is sent until it restarts."
        )
    )
    sha256: Annotated[str, Field(max_length=64)] | None = Field(default=None, description="Files concerned.")
    message: Annotated[str, Field(max_length=4096)] = Field(description="The engine's or the agent's message.")


class EngineReport(ApiModel):
    """What one replica's adapter agent saw on its engine; written by that agent only."""

    name: Annotated[str, Field(max_length=253)] = Field(description="Replica (engine pod) name.")
    pod_uid: Annotated[str, Field(max_length=64)] | None = Field(
        default=None,
        description="UID of the pod the agent runs in: a report of an earlier pod of the name counts for nothing.",
    )
    engine_up: bool = Field(description="The engine answered its last /v1/models.")
    adapters: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=1024)] = Field(
        default_factory=list,
        description="Adapters the engine lists in /v1/models (names of this LoraServer only).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    loaded_sha256: dict[str, Annotated[str, Field(max_length=64)]] = Field(
        default_factory=dict, description="sha256 of the files each listed adapter was loaded from."
    )
    errors: Annotated[list[AdapterError], Field(max_length=256)] = Field(
        default_factory=list,
        description="Adapters the engine refused.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    last_sync_time: Annotated[str, Field(max_length=64)] | None = Field(
        default=None,
        description="When the agent last compared the engine with the placement (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )


class LoraServerStatus(BaseStatus):
    """Observed state of a LoraServer."""

    replicas: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Engine pods that exist.")
    ready_replicas: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Engine pods that are ready.")
    desired_replicas: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Engine pods wanted: shared replicas plus each expert adapter's own."
    )
    adapters_loaded: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Adapters Loaded.")
    adapters_total: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Adapters in the spec.")
    adapters: Annotated[list[AdapterPlacement], Field(max_length=256)] = Field(
        default_factory=list,
        description="Per-adapter state, from what the engines list.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    engines: Annotated[list[EngineReport], Field(max_length=1024)] = Field(
        default_factory=list,
        description="Per-replica reports of the adapter agents (each agent writes its own entry).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    router_ready_replicas: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Router pods ready.")
    endpoint: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None,
        description="In-cluster base URL of the OpenAI-compatible endpoint, while a router pod is ready on it.",
    )


PRINTER_COLUMNS = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.desiredReplicas"},
    {"name": "Adapters", "type": "integer", "jsonPath": ".status.adaptersLoaded"},
    {"name": "Of", "type": "integer", "jsonPath": ".status.adaptersTotal"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)
