"""The contract between the operator and each engine pod's adapter agent: the serving plan.

The operator decides which adapters each replica must hold (placement) and where their files come
from; it writes that decision into one ConfigMap per LoraServer, under ``PLAN_KEY``. Each agent
reads it, makes its engine match it, and reports what the engine lists into the LoraServer's
``status.engines`` under its own field manager. The operator never trusts the plan as a fact:
status is computed from the agents' reports of the engines' own ``/v1/models``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kimi_operator.api.base import ApiModel

PLAN_KEY = "plan.json"
AGENT_FIELD_MANAGER_PREFIX = "kimi-agent-"
# The adapter converted for llama.cpp, beside adapter_model.safetensors in the adapter's directory
# (written at export; a llama-server engine loads this file from the node cache).
GGUF_ADAPTER_FILE = "adapter.gguf"
EngineApi = Literal["sglang", "llamacpp"]


class AdapterFiles(ApiModel):
    """Where an adapter's files are, as the agent can reach them."""

    kind: Literal["node", "store", "hub"] = Field(
        description="node: a directory on the node; store: on the shared adapter store; hub: a hub repository."
    )
    path: str | None = Field(
        default=None, description="node: relative to the model storage; store: relative to the adapter store."
    )
    node: str | None = Field(default=None, description="node: the only node holding it, when not every node does.")
    repo: str | None = Field(default=None, description="hub: owner/name.")
    revision: str | None = Field(default=None, description="hub: commit sha or tag.")
    subfolder: str | None = Field(default=None, description="hub: directory of the adapter in the repository.")
    endpoint: str | None = Field(default=None, description="hub: endpoint (mirror).")


class PlannedAdapter(ApiModel):
    name: str = Field(description="Adapter name as the engine knows it.")
    sha256: str | None = Field(
        default=None, description="Expected sha256 of adapter_model.safetensors; checked before loading."
    )
    files: AdapterFiles
    pinned: bool = False
    gguf_sha256: str | None = Field(
        default=None,
        description=(
            "llama.cpp: expected sha256 of adapter.gguf (a FineTuneJob's export); checked before the engine starts."
        ),
    )


class ReplicaPlan(ApiModel):
    replica: str = Field(description="Engine pod name.")
    expert: bool = Field(default=False, description="A dedicated replica: its one adapter is loaded at start.")
    adapters: Annotated[list[PlannedAdapter], Field(max_length=1024)] = Field(default_factory=list)


class ServingPlan(ApiModel):
    """Everything the agents of one LoraServer need to know, in one document."""

    served_model_name: str
    generation: int = Field(description="metadata.generation of the LoraServer the plan was made from.")
    # Left out for SGLang (None): an agent of an earlier version, which knows no such field, keeps
    # reading the plans of its LoraServer after the operator is upgraded.
    engine: EngineApi | None = Field(
        default=None,
        description=(
            "None (SGLang): adapters loaded and unloaded through the engine's API; llamacpp: llama-server, "
            "whose adapters are fixed at its start (the agent only fetches them before the start and reports)."
        ),
    )
    replicas: list[ReplicaPlan] = Field(default_factory=list)

    def for_replica(self, name: str) -> ReplicaPlan | None:
        return next((r for r in self.replicas if r.replica == name), None)
