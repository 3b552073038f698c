"""KimiModel: where the weights come from, which nodes hold them, and in which variants."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import ConfigDict, Field

from kimi_operator.api.base import (
    AbsolutePath,
    ApiModel,
    ObjectName,
    PodMetadata,
    Quantity,
    SecretKeyRef,
    cel,
    immutable,
)
from kimi_operator.api.common_status import BaseStatus

KIND = "KimiModel"
PLURAL = "kimimodels"
SHORT_NAMES = ("km",)

# The variants a node can hold. bf16 feeds training; the cpu-* variants are kt-kernel CPU expert
# weights for serving (AMXINT8 / AMXINT4); native-int4 is the shipped checkpoint as is (RAWINT4);
# gguf is one quantization of a GGUF repository, for llama.cpp.
Variant = Literal["bf16", "cpu-int8", "cpu-int4", "native-int4", "gguf"]
# A file inside the quantization's directory: relative, and no part of it starts with a dot (so no
# '..'), as it becomes part of a path in the engine pods.
GgufEntry = Annotated[
    str,
    Field(min_length=1, max_length=1024, pattern=r"^([A-Za-z0-9_][-A-Za-z0-9_.]*/)*[A-Za-z0-9_][-A-Za-z0-9_.]*\.gguf$"),
]
# The variants made from the INT4 checkpoint: a model asking for none of them never downloads it.
FROM_CHECKPOINT: tuple[Variant, ...] = ("bf16", "cpu-int8", "cpu-int4", "native-int4")
VARIANTS = len(get_args(Variant))

_REPO_ID = r"^[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*$"


class HuggingFaceSource(ApiModel):
    """A model repository on the Hugging Face hub, pinned to one revision."""

    repo: Annotated[str, Field(min_length=3, max_length=200, pattern=_REPO_ID)] = Field(
        description="Repository id, owner/name, e.g. moonshotai/Kimi-K2.5."
    )
    revision: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\s]+$")] = Field(
        description=(
            "Revision to download: a commit sha (recommended) or a tag/branch, resolved once to a commit sha "
            "recorded in status (resolvedRevision; resolvedGgufRevision for spec.gguf). Immutable."
        ),
        json_schema_extra={"x-kubernetes-validations": [immutable("the revision")]},
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a hub token; passed to the download pod as an environment variable only.",
    )
    endpoint: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^\s]+$")] | None = Field(
        default=None, description="Hub endpoint, for a mirror; defaults to the public hub."
    )


class PathSource(ApiModel):
    """Weights already present at the same path on every selected node."""

    path: AbsolutePath = Field(description="Absolute path on the node of the native INT4 checkpoint directory.")


class ModelSource(ApiModel):
    """Exactly one of huggingFace or path."""

    hugging_face: HuggingFaceSource | None = Field(default=None, description="Download from the hub.")
    path: PathSource | None = Field(default=None, description="Use weights already on the nodes.")


class GgufSource(ApiModel):
    """One quantization of a GGUF repository (the guide's unsloth/Kimi-K2.5-GGUF, say): only its
    files are downloaded."""

    hugging_face: HuggingFaceSource = Field(description="The GGUF repository, pinned to one revision.")
    quantization: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")] = Field(
        description=(
            "The quantization, as the repository names it (e.g. UD-TQ1_0, UD-Q2_K_XL, UD-Q4_K_XL): a "
            "directory of split files, or the tail of a single file's name."
        )
    )


class NodeSelectorSpec(ApiModel):
    """Nodes chosen by labels."""

    match_labels: Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(min_length=1, max_length=32)] = (
        Field(description="Labels a node must carry to be a candidate.")
    )


class Placement(ApiModel):
    """Which nodes hold the weights: named nodes, or a label selector and a count."""

    node_names: Annotated[list[ObjectName], Field(min_length=1, max_length=64)] | None = Field(
        default=None,
        description="Nodes to prepare, by name.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    node_selector: NodeSelectorSpec | None = Field(
        default=None, description="Choose candidates by label; the operator picks `count` eligible ones."
    )
    count: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="How many nodes must hold the weights for the model to be Ready."
    )


class Storage(ApiModel):
    """Node-local storage for the weights: the one place the path is declared."""

    host_path: AbsolutePath = Field(
        description="Absolute directory on each node's local NVMe under which the model's files are kept."
    )
    reclaim_policy: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description="Retain keeps the files when the KimiModel is deleted; Delete removes them with a cleanup Job.",
    )


class PrepareResources(ApiModel):
    """Resources of each prepare Job's pod."""

    cpu: Quantity = Field(default="16", description="CPU request and limit of the prepare pod.")
    memory: Quantity = Field(default="64Gi", description="Memory request and limit of the prepare pod.")
    download_concurrency: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8, description="Files downloaded in parallel."
    )


class KimiModelSpec(ApiModel):
    """Desired state of a KimiModel."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "('gguf' in self.variants) == has(self.gguf)",
                    "spec.gguf is required with the gguf variant, and only with it",
                    field_path=".gguf",
                ),
                # Once set, for good: a field-level rule would let it be removed and set again.
                cel(
                    "!has(oldSelf.gguf) || (has(self.gguf) && self.gguf == oldSelf.gguf)",
                    "spec.gguf is immutable once set; create a new object to change it",
                    field_path=".gguf",
                ),
            ]
        }
    )

    source: ModelSource = Field(
        description="Where the native INT4 checkpoint comes from. Immutable.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.huggingFace), has(self.path)].exists_one(x, x)",
                    "exactly one of huggingFace or path must be set",
                ),
                immutable("spec.source"),
            ]
        },
    )
    placement: Placement = Field(
        description="Which nodes hold the weights.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.nodeNames), has(self.nodeSelector)].exists_one(x, x)",
                    "exactly one of nodeNames or nodeSelector must be set",
                ),
                cel(
                    "!has(self.nodeNames) || self.count <= size(self.nodeNames)",
                    "count must not exceed the number of nodeNames",
                    field_path=".count",
                ),
            ]
        },
    )
    variants: Annotated[list[Variant], Field(min_length=1, max_length=VARIANTS)] = Field(
        default_factory=lambda: list[Variant](["bf16", "cpu-int8"]),
        description=(
            "Weight variants each node must hold: bf16 (training), cpu-int8 / cpu-int4 (kt-kernel CPU "
            "experts for serving), native-int4 (the shipped checkpoint, for RAWINT4 serving), gguf (the "
            "quantization spec.gguf names, for llama.cpp; alone, the INT4 checkpoint is not downloaded)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    gguf: GgufSource | None = Field(default=None, description="Where the gguf variant comes from. Immutable once set.")
    storage: Storage = Field(
        description=(
            "Node-local directory for the files. Immutable: training and serving pods mount it, and cleanup removes it."
        ),
        json_schema_extra={"x-kubernetes-validations": [immutable("spec.storage")]},
    )
    resources: PrepareResources = Field(
        default_factory=PrepareResources,
        description=(
            "Resources of the prepare Jobs; a change applies to Jobs created after it (a Job is never changed)."
        ),
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata,
        description=(
            "Labels and annotations for the prepare and cleanup pods; a change applies to Jobs created after it."
        ),
    )


NodePhase = Literal["Pending", "Ineligible", "Preparing", "Ready", "Failed", "Deleting"]
PrepareStep = Literal["DiskCheck", "Downloading", "Verifying", "ConvertingBF16", "ConvertingCPU", "Done"]


class NodeProgress(ApiModel):
    """Progress of the prepare pod on this node, written by that pod under its own field manager."""

    step: PrepareStep = Field(description="The step the prepare pod is in.")
    bytes_done: Annotated[int, Field(ge=0)] = Field(description="Bytes done in this step.")
    bytes_total: Annotated[int, Field(ge=0)] = Field(description="Bytes in this step.")
    percent: Annotated[int, Field(ge=0, le=100)] = Field(description="Percent of this step done.")
    bytes_per_second: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Recent rate.")
    eta: Annotated[str, Field(max_length=32)] | None = Field(
        default=None, description="Time left in this step (H:MM:SS)."
    )
    revision: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="Commit sha the pod resolved the requested revision to."
    )
    gguf_revision: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="Commit sha the pod resolved spec.gguf's revision to."
    )
    gguf_entry: GgufEntry | None = Field(
        default=None, description="The file of the quantization llama.cpp loads (its first split part)."
    )
    update_time: Annotated[str, Field(max_length=64)] = Field(
        description="When the pod last reported (RFC 3339).", json_schema_extra={"format": "date-time"}
    )


class NodeStatus(ApiModel):
    """Preparation state on one node."""

    name: ObjectName = Field(description="Node name.")
    phase: NodePhase = Field(description="Where preparation on this node stands.")
    variants: Annotated[list[Variant], Field(max_length=VARIANTS)] = Field(
        default_factory=list, description="Variants verified complete on this node."
    )
    job: Annotated[str, Field(max_length=63)] | None = Field(default=None, description="The prepare Job of this node.")
    message: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None, description="Why the node is ineligible or failed, or what it is doing."
    )
    progress: NodeProgress | None = Field(default=None, description="Live progress reported by the prepare pod.")


class KimiModelStatus(BaseStatus):
    """Observed state of a KimiModel."""

    resolved_revision: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="Commit sha the requested revision resolved to."
    )
    resolved_gguf_revision: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="Commit sha spec.gguf's revision resolved to."
    )
    gguf_entry: GgufEntry | None = Field(
        default=None,
        description=(
            "The file llama.cpp loads (the quantization's first split part), relative to the quantization's "
            "directory, as the prepare pods found it in the repository."
        ),
    )
    ready_nodes: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Number of nodes holding every requested variant."
    )
    nodes: Annotated[list[NodeStatus], Field(max_length=256)] = Field(
        default_factory=list,
        description="Per-node state, ineligible candidates included with the reason.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


# Printer columns: real state only.
PRINTER_COLUMNS = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready-Nodes", "type": "integer", "jsonPath": ".status.readyNodes"},
    {"name": "Wanted", "type": "integer", "jsonPath": ".spec.placement.count"},
    {"name": "Step", "type": "string", "jsonPath": ".status.nodes[*].progress.step"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.nodes[*].progress.percent"},
    {"name": "Revision", "type": "string", "jsonPath": ".status.resolvedRevision", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)
