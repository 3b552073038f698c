"""Prometheus metrics of the operator, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kimi_operator import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

BUILD_INFO = Gauge("kimi_operator_build_info", "Version of the running operator.", ["version"], registry=REGISTRY)
BUILD_INFO.labels(version=__version__).set(1)

RECONCILE_TOTAL = Counter(
    "kimi_operator_reconcile_total",
    "Reconcile passes, by kind and result (ready, progressing, stalled, waiting, error).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kimi_operator_reconcile_duration_seconds",
    "Duration of one reconcile pass.",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RESOURCE_CONDITION = Gauge(
    "kimi_operator_resource_condition",
    "1 when the object's condition of this type is True, else 0.",
    ["kind", "namespace", "name", "type"],
    registry=REGISTRY,
)
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled")


def record_conditions(kind: str, namespace: str, name: str, true_types: set[str]) -> None:
    for type_ in CONDITION_TYPES:
        RESOURCE_CONDITION.labels(kind, namespace, name, type_).set(1 if type_ in true_types else 0)


def forget(kind: str, namespace: str, name: str) -> None:
    for type_ in CONDITION_TYPES:
        try:
            RESOURCE_CONDITION.remove(kind, namespace, name, type_)
        except KeyError:
            continue
