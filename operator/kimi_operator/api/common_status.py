"""Status fields every kind carries."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from kimi_operator.api.base import ApiModel
from kimi_operator.api.conditions import Condition


class BaseStatus(ApiModel):
    """observedGeneration and conditions, in the Kubernetes conventions."""

    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="metadata.generation of the spec the operator last acted on."
    )
    conditions: Annotated[list[Condition], Field(max_length=16)] = Field(
        default_factory=list,
        description="Ready, and while abnormal-true, Reconciling or Stalled (metav1.Condition shape).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    phase: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="One-word summary of the conditions, for display only."
    )
