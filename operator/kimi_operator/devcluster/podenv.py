"""The kubelet's rules for a container's environment, computed without any I/O
(kubelet ``kuberuntime``/``envvars``, ``third_party/forked/golang/expansion``):

- ``envFrom`` first (with its prefix), then ``env`` in order; a ``value`` expands ``$(VAR)`` from the
  variables before it (``$$`` is a literal ``$``, an unknown ``$(VAR)`` stays as written).
- ``fieldRef``; ``resourceFieldRef`` (cpu rounded up to whole divisors, limits defaulting to the
  node's allocatable); ``secretKeyRef``/``configMapKeyRef`` (optional ones skipped when missing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from kimi_operator.render.quantity import parse_quantity


class PlanError(ValueError):
    """The pod cannot be run here; the message says why (the pod fails with it)."""


class MissingReference(PlanError):
    """A Secret or ConfigMap (or one of its keys) the pod needs does not exist (yet): the kubelet
    retries until it does."""


@dataclasses.dataclass(frozen=True)
class References:
    """What the pod refers to, as read from the API: a missing name or key is simply absent."""

    secrets: Mapping[str, Mapping[str, bytes]] = dataclasses.field(default_factory=dict)
    config_maps: Mapping[str, Mapping[str, bytes]] = dataclasses.field(default_factory=dict)
    tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)  # by audience ("" = the API server's)
    allocatable: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the node's


# -- quantities, field and resource references ------------------------------------------------------


def quantity(text: str | int | float) -> Fraction:
    """A Kubernetes quantity ("500m", "16Gi", "1e3", 2) as an exact number (the operator's own
    parser, in Decimal, which converts exactly)."""
    try:
        return Fraction(parse_quantity(str(text)))
    except ValueError as exc:
        raise PlanError(f"not a quantity: {text!r}") from exc


def resource_value(resource: str, quantity_text: str | None, divisor: str | None) -> str:
    """A resourceFieldRef's value as the kubelet computes it: cpu in whole divisors (millicores
    first, rounded up), memory and storage in whole divisors of whole bytes, rounded up."""
    amount = quantity(quantity_text or "0")
    # The apiserver defaults an absent divisor to "0", which means 1.
    div = quantity(divisor or "0") or Fraction(1)
    if div < 0:
        raise PlanError(f"divisor of {resource} must be positive")
    if resource.endswith(".cpu"):
        return str(math.ceil(Fraction(math.ceil(amount * 1000), math.ceil(div * 1000))))
    return str(math.ceil(Fraction(math.ceil(amount), math.ceil(div))))


_RESOURCES = ("cpu", "memory", "ephemeral-storage")


def resource_field(
    pod: Mapping[str, Any], container: Mapping[str, Any], ref: Mapping[str, Any], refs: References
) -> str:
    resource = str(ref.get("resource") or "")
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or name not in _RESOURCES:
        raise PlanError(f"resourceFieldRef {resource!r} is not supported")
    target = container
    if ref.get("containerName"):
        everything = [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]
        found = [c for c in everything if c.get("name") == ref["containerName"]]
        if not found:
            raise PlanError(f"resourceFieldRef names no container {ref['containerName']!r}")
        target = found[0]
    resources = target.get("resources") or {}
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "limits":
        # No limit: the node's allocatable, as the kubelet does.
        value = refs.allocatable.get(name)
    return resource_value(resource, value, ref.get("divisor"))


_LABEL_REF = re.compile(r"metadata\.(labels|annotations)\['([^']*)'\]")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """A fieldRef's value (downward API)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(i.get("ip", "") for i in status.get("hostIPs") or []),
        "status.podIPs": ",".join(i.get("ip", "") for i in status.get("podIPs") or []),
    }
    if path in simple:
        return str(simple[path] or "")
    match = _LABEL_REF.fullmatch(path)
    if match:
        return str((meta.get(match[1]) or {}).get(match[2], ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in items)
    raise PlanError(f"fieldRef {path!r} is not supported")


# -- $(VAR) expansion -----------------------------------------------------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' expansion: ``$(NAME)`` from ``env`` (unknown names stay as written), ``$$`` -> ``$``."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char != "$" or i + 1 >= n:
            out.append(char)
            i += 1
            continue
        following = text[i + 1]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "(":
            close = text.find(")", i + 2)
            if close < 0:
                out.append("$(")
                i += 2
            else:
                name = text[i + 2 : close]
                out.append(env.get(name, f"$({name})"))
                i = close + 1
        else:
            out.append("$" + following)
            i += 2
    return "".join(out)


# -- env ----------------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def _key(kind: str, source: Mapping[str, Mapping[str, bytes]], ref: Mapping[str, Any], where: str) -> bytes | None:
    name, key, optional = ref.get("name") or "", ref.get("key") or "", bool(ref.get("optional"))
    data = source.get(name)
    if data is None or key not in data:
        if optional:
            return None
        missing = f"{kind} {name!r}" if data is None else f"key {key!r} in {kind} {name!r}"
        raise MissingReference(f"{where}: {missing} not found")
    return data[key]


def _value_from(
    pod: Mapping[str, Any], container: Mapping[str, Any], value_from: Mapping[str, Any], refs: References, where: str
) -> str | None:
    if "fieldRef" in value_from:
        return field_value(pod, value_from["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in value_from:
        return resource_field(pod, container, value_from["resourceFieldRef"], refs)
    for kind, field, store in (
        ("Secret", "secretKeyRef", refs.secrets),
        ("ConfigMap", "configMapKeyRef", refs.config_maps),
    ):
        if field in value_from:
            raw = _key(kind, store, value_from[field], where)
            return None if raw is None else raw.decode(errors="replace")
    raise PlanError(f"{where} has an unsupported valueFrom")


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any], refs: References) -> dict[str, str]:
    """The container's own variables (envFrom, then env), as the kubelet resolves them."""
    env: dict[str, str] = {}
    where = f"container {container.get('name')}"
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, field, store in (
            ("Secret", "secretRef", refs.secrets),
            ("ConfigMap", "configMapRef", refs.config_maps),
        ):
            if field not in source:
                continue
            ref = source[field]
            data = store.get(ref.get("name") or "")
            if data is None:
                if ref.get("optional"):
                    continue
                raise MissingReference(f"{where}: {kind} {ref.get('name')!r} not found")
            for key, raw in data.items():
                if _ENV_NAME.fullmatch(prefix + key):
                    env[prefix + key] = raw.decode(errors="replace")
    for var in container.get("env") or []:
        name = var["name"]
        if not var.get("valueFrom"):
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        resolved = _value_from(pod, container, var["valueFrom"], refs, f"{where}: env {name}")
        if resolved is not None:
            env[name] = resolved
    return env
