"""The router's Prometheus metrics: per model (the base name or an adapter) and per key id.

SGLang has no per-adapter metric (REFERENCE.md): these are the only ones. Labels stay bounded:
``model`` is the served name, an adapter of the LoraServer, or "unknown" (never what a client
typed), and ``key`` is a key id of the spec, "none" on an open server, or "invalid".
"""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

# Time to first token and total latency, from ~5 ms to an hour (a long prompt on CPU experts).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

REQUESTS = Counter(
    "kimi_router_requests",
    "Requests answered, by model, key id and HTTP status code.",
    ["model", "key", "code"],
)
FIRST_TOKEN = Histogram(
    "kimi_router_time_to_first_token_seconds",
    "From the request's arrival to the first byte of the answer sent to the client (streams: the first event).",
    ["model"],
    buckets=_BUCKETS,
)
LATENCY = Histogram(
    "kimi_router_request_duration_seconds",
    "From the request's arrival to the end of its answer.",
    ["model"],
    buckets=_BUCKETS,
)
PROMPT_TOKENS = Counter("kimi_router_prompt_tokens", "Prompt tokens, from the engines' usage.", ["model", "key"])
COMPLETION_TOKENS = Counter(
    "kimi_router_completion_tokens", "Completion tokens, from the engines' usage.", ["model", "key"]
)
IN_FLIGHT = Gauge("kimi_router_requests_in_flight", "Requests being answered now.", ["model"])
RETRIES = Counter(
    "kimi_router_retries", "Requests moved to another replica before any byte reached the client.", ["model"]
)
UPSTREAM = Counter(
    "kimi_router_upstream_requests",
    "Requests sent to each engine replica, by model and the engine's HTTP status (0: unreachable).",
    ["replica", "model", "code"],
)
REPLICAS = Gauge("kimi_router_replicas", "Engine replicas the router knows, by readiness.", ["ready"])

_M = TypeVar("_M", bound=MetricWrapperBase)
# Each labelled child, found once: ``labels()`` takes a lock and builds its key on every call, and
# the router asks for several children per request (and one per streamed event). A child is never
# removed from its metric (the router calls no remove() or clear()), so a cached one stays the one
# prometheus_client exports; the cache holds no label set the metric does not hold already.
_CHILDREN: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}


def child(metric: _M, *labels: str) -> _M:
    """``metric.labels(*labels)``, looked up once per label set."""
    key = (metric, labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found  # type: ignore[return-value]
