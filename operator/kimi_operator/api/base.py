"""Shared building blocks of the API: the model base class, field helpers and common types.

Everything here is pure data. CRD-only facts that pydantic's JSON schema cannot carry (CEL rules,
list types, int-or-string) ride along in ``json_schema_extra`` under the Kubernetes extension keys;
``kimi_operator.api.crd`` turns the result into structural OpenAPI.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# A JSON object as json_schema_extra takes it (Any: dict is invariant in its value type).
JsonDict = dict[str, Any]

GROUP = "kimi-operator.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class ApiModel(BaseModel):
    """Base of every spec/status object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the Kubernetes API stores it: camelCase, unset optionals omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> JsonDict:
    """One ``x-kubernetes-validations`` entry."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def immutable(what: str) -> JsonDict:
    return cel("self == oldSelf", f"{what} is immutable; create a new object to change it")


# A non-negative Kubernetes quantity ("64Gi", "500m", 8): apimachinery's grammar without a sign.
_QUANTITY = re.compile(r"^\+?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")


def _check_quantity(value: str | int) -> str | int:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 64Gi, 500m, 8)")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                cel(
                    "type(self) == int ? self >= 0 : isQuantity(self) && !self.startsWith('-')",
                    "must be a non-negative Kubernetes quantity such as 64Gi, 500m or 8",
                )
            ],
        }
    ),
]

# RFC 1123 label: names of Kubernetes objects that end up in labels or DNS.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# RFC 1123 subdomain: names of objects such as Secrets, ConfigMaps, Nodes.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
LabelName = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
AbsolutePath = Annotated[str, Field(min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")]


class SecretKeyRef(ApiModel):
    """A key of a Secret in the object's namespace."""

    name: ObjectName = Field(description="Name of the Secret in the same namespace.")
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = Field(
        description="Key within the Secret whose value is used."
    )


class ObjectRef(ApiModel):
    """A reference by name to an object of a known kind in the same namespace."""

    name: ObjectName = Field(description="Name of the object in the same namespace.")


class PodMetadata(ApiModel):
    """Extra labels and annotations for the pods the operator starts for this object."""

    labels: Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=32)] = Field(
        default_factory=dict, description="Labels added to the pods (e.g. for cost allocation or policies)."
    )
    annotations: Annotated[dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=32)] = Field(
        default_factory=dict, description="Annotations added to the pods."
    )
