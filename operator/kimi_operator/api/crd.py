"""Generate structural CustomResourceDefinitions from the pydantic models.

pydantic's JSON schema is close to OpenAPI v3 but not structural: it uses ``$ref``/``$defs``,
``anyOf`` with ``null`` for optionals, ``const`` for one-value literals, and titles. This module
inlines references, collapses optionals, keeps descriptions/defaults/bounds, and passes the
Kubernetes extensions (``x-kubernetes-*``) through.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from kimi_operator.api.base import GROUP, VERSION, ApiModel
from kimi_operator.api.kinds import KINDS, MAX_NAME, Kind

_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "properties",
    "items",
    "additionalProperties",
}


class _FactoryDefaults(GenerateJsonSchema):
    """Also emit defaults given by ``default_factory``, so the apiserver fills nested defaults."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()  # type: ignore[call-arg]
            # The wire form (camelCase, unset optionals left out): CEL rules on the object are
            # checked against this default when the CRD is created.
            wire = value.to_wire() if isinstance(value, ApiModel) else value
            schema = {**schema, "default": wire}
            schema.pop("default_factory", None)
        return super().default_schema(schema)


class SchemaError(ValueError):
    """The models produced a schema the generator cannot make structural."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target: dict[str, Any] = copy.deepcopy(defs[ref.rsplit("/", 1)[-1]])
    # Field-level keys (description, default, x-kubernetes-*) sit beside the $ref and win.
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:  # noqa: PLR0912
    node = _resolve(node, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(f"{path}: unions other than Optional[X] are not structural")
        merged = _resolve(options[0], defs)
        merged = {**merged, **{k: v for k, v in node.items() if k != "anyOf"}}
        if "default" in merged and merged["default"] is None:
            del merged["default"]
        return _structural(merged, defs, path)
    out: dict[str, Any] = {}
    if node.get("x-kubernetes-int-or-string"):
        out["x-kubernetes-int-or-string"] = True
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "const" in node:
        out["type"] = "string"
        out["enum"] = [node["const"]]
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = copy.deepcopy(value)
        elif key in _KEEP:
            if key == "properties":
                out[key] = {name: _structural(sub, defs, f"{path}.{name}") for name, sub in value.items()}
            elif key == "items":
                out[key] = _structural(value, defs, f"{path}[]")
            elif key == "additionalProperties":
                # `false` is pydantic's extra="forbid"; structural schemas cannot say it (the
                # apiserver prunes or, with strict field validation, rejects unknown fields).
                if isinstance(value, dict):
                    out[key] = _structural(value, defs, f"{path}{{}}")
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                # JSON Schema 2020 gives the bound; OpenAPI v3.0 wants the bound plus a flag.
                out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
                out[key] = True
            else:
                out[key] = copy.deepcopy(value)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        raise SchemaError(f"{path}: object without properties is not structural")
    if "type" not in out and "x-kubernetes-int-or-string" not in out:
        raise SchemaError(f"{path}: no type")
    return out


def model_schema(kind: Kind) -> dict[str, Any]:
    """The openAPIV3Schema of one kind."""
    spec_raw = kind.spec.model_json_schema(by_alias=True, mode="validation", schema_generator=_FactoryDefaults)
    status_raw = kind.status.model_json_schema(by_alias=True, mode="serialization", schema_generator=_FactoryDefaults)
    spec = _structural(spec_raw, spec_raw.get("$defs", {}), "spec")
    status = _structural(status_raw, status_raw.get("$defs", {}), "status")
    spec["description"] = f"Desired state of the {kind.kind}."
    status["description"] = f"Observed state of the {kind.kind}, written by the operator and its pods."
    return {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion of the object: kimi-operator.io/v1alpha1.",
            },
            "kind": {"type": "string", "description": f"Kind of the object: {kind.kind}."},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": MAX_NAME,
                        "description": "Name of the object; it names Jobs, Services and label values.",
                    }
                },
            },
            "spec": spec,
            "status": status,
        },
    }


def crd(kind: Kind) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.crd_name,
            "labels": {
                "app.kubernetes.io/name": "kimi-operator",
                "app.kubernetes.io/part-of": "kimi-operator",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": ["kimi", "all-kimi"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in kind.printer_columns],
                    "schema": {"openAPIV3Schema": model_schema(kind)},
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [crd(k) for k in KINDS]
