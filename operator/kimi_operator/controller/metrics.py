"""Prometheus metrics of the operator, in a registry of its own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kimi_operator import __version__
from kimi_operator.api.durations import seconds

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


# A FineTuneJob's status.progress, as its training pod last reported it: one gauge per field, so a
# dashboard can plot loss and throughput over time and alert on a stalled run.
TRAINING = {
    field: Gauge(f"kimi_operator_finetune_{metric}", help_, ["namespace", "name"], registry=REGISTRY)
    for field, metric, help_ in (
        ("step", "step", "Current optimiser step."),
        ("totalSteps", "total_steps", "Optimiser steps of the whole run."),
        ("percent", "progress_percent", "Percent of the run done."),
        ("loss", "loss", "Latest training loss."),
        ("learningRate", "learning_rate", "Latest learning rate."),
        ("epoch", "epoch", "Current epoch (fractional)."),
        ("tokensPerSecond", "tokens_per_second", "Input tokens trained per second by the current pod."),
        ("eta", "eta_seconds", "Estimated seconds left."),
    )
}


def record_training(namespace: str, name: str, progress: Mapping[str, Any] | None) -> None:
    """Set the training gauges from status.progress; fields not (or no longer) reported are dropped."""
    _set_fields(TRAINING, progress or {}, namespace, name)


def _set_fields(gauges: Mapping[str, Gauge], values: Mapping[str, Any], *labels: str) -> None:
    """One gauge per status field: numbers are set (an ETA string in seconds), anything else removed."""
    for field, gauge in gauges.items():
        value = values.get(field)
        if field == "eta" and isinstance(value, str):
            value = seconds(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            gauge.labels(*labels).set(value)
        else:
            _remove(gauge, *labels)


# A KimiModel's per-node preparation, as each prepare pod last reported it (download, verify,
# convert): the 600 GB download is the step users most want to watch.
PREPARE = {
    field: Gauge(f"kimi_operator_model_prepare_{metric}", help_, ["namespace", "name", "node"], registry=REGISTRY)
    for field, metric, help_ in (
        ("bytesDone", "bytes_done", "Bytes done in the node's current prepare step."),
        ("bytesTotal", "bytes_total", "Bytes in the node's current prepare step."),
        ("percent", "percent", "Percent of the node's current prepare step done."),
        ("bytesPerSecond", "bytes_per_second", "Recent rate of the node's current prepare step."),
        ("eta", "eta_seconds", "Estimated seconds left in the node's current prepare step."),
    )
}
NODE_READY = Gauge(
    "kimi_operator_model_node_ready",
    "1 when the node holds every requested variant of the model, else 0.",
    ["namespace", "name", "node"],
    registry=REGISTRY,
)
_MODEL_NODES: dict[tuple[str, str], set[str]] = {}


def record_model(namespace: str, name: str, nodes: list[Mapping[str, Any]] | None) -> None:
    """Set the per-node gauges from status.nodes; nodes that left the status are dropped."""
    seen = set()
    for node in nodes or []:
        node_name = str(node.get("name"))
        seen.add(node_name)
        NODE_READY.labels(namespace, name, node_name).set(1 if node.get("phase") == "Ready" else 0)
        _set_fields(PREPARE, node.get("progress") or {}, namespace, name, node_name)
    for gone in _MODEL_NODES.get((namespace, name), set()) - seen:
        for gauge in (*PREPARE.values(), NODE_READY):
            _remove(gauge, namespace, name, gone)
    _MODEL_NODES[(namespace, name)] = seen


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        return


def record_conditions(kind: str, namespace: str, name: str, true_types: set[str]) -> None:
    for type_ in CONDITION_TYPES:
        RESOURCE_CONDITION.labels(kind, namespace, name, type_).set(1 if type_ in true_types else 0)


def forget(kind: str, namespace: str, name: str) -> None:
    for type_ in CONDITION_TYPES:
        _remove(RESOURCE_CONDITION, kind, namespace, name, type_)
    if kind == "FineTuneJob":
        record_training(namespace, name, None)
    if kind == "KimiModel":
        record_model(namespace, name, None)
        _MODEL_NODES.pop((namespace, name), None)
