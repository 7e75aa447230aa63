"""``GET /metrics`` on the API port, in Prometheus' text format.

Two parts, one scrape:

- the ingress's own request metrics (``raystages_*``), recorded by the HTTP guard for every
  request: count by route, model and status; latency and time to first byte; tokens in
  and out; requests in flight;
- what Ray's metrics agent on the same node exports: Ray Serve's replica metrics
  (``ray_serve_*``: queue lengths, processing latency, errors per deployment) and vLLM's
  engine metrics (``ray_vllm_*``: time to first token, running/waiting requests, KV-cache
  usage, tokens per second), which the engines publish through ``ray.util.metrics``.

The agent aggregates every process on its node; on a multi-node cluster scrape each node's
agent (its ``metrics_export_port``) as well, as Ray documents.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
REQUESTS = Counter("raystages_requests", "HTTP requests by route, model and status.",
                   ["route", "model", "status"], registry=REGISTRY)
LATENCY = Histogram("raystages_request_seconds", "Time from request to the last byte of the response.",
                    ["route", "model"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
FIRST_BYTE = Histogram("raystages_time_to_first_byte_seconds",
                       "Time from request to the first body byte (for streams: the first token).",
                       ["route", "model"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
TOKENS = Counter("raystages_tokens", "Prompt and completion tokens of answered requests.",
                 ["model", "kind"], registry=REGISTRY)
IN_FLIGHT = Gauge("raystages_requests_in_flight", "Requests being answered now.", ["route"], registry=REGISTRY)
# Routes we label by name; anything else (404s, scans) is "other", so a client cannot
# grow the label set without bound.
KNOWN_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/score", "/v1/models", "/health", "/ready",
                "/metrics"}
_AGENT_TIMEOUT_S = 2.0
_log = logging.getLogger("raystages.serve")


def route_label(path: str) -> str:
    if path in KNOWN_ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class RequestTimer:
    """What the guard records for one request; ``model`` and ``usage`` come from the route
    (``request.state``) once it has resolved them."""

    def __init__(self, path: str):
        self.route = route_label(path)
        self.t0 = time.perf_counter()
        self.first_byte: float | None = None
        self.status = 500
        self.complete = False  # the last body message went out
        self.failed = False  # an exception ended the response after its headers
        IN_FLIGHT.labels(self.route).inc()

    def on_message(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            if self.first_byte is None and message.get("body"):
                self.first_byte = time.perf_counter() - self.t0
            self.complete = not message.get("more_body", False)

    def done(self, state: dict) -> None:
        model = str(state.get("model") or "-")
        # A response that stopped before its last byte without an error of ours stopped
        # because the client went away (Serve cancels the call, Starlette ends a stream on
        # disconnect): counted as nginx counts it, 499, not as the 200 its headers said.
        status = self.status if self.complete else 500 if self.failed else 499
        IN_FLIGHT.labels(self.route).dec()
        REQUESTS.labels(self.route, model, str(status)).inc()
        LATENCY.labels(self.route, model).observe(time.perf_counter() - self.t0)
        if self.first_byte is not None:
            FIRST_BYTE.labels(self.route, model).observe(self.first_byte)
        usage = state.get("usage") or {}
        for kind in ("prompt_tokens", "completion_tokens"):
            if usage.get(kind):
                TOKENS.labels(model, kind.removesuffix("_tokens")).inc(usage[kind])


_agent_url: str | None = None


def _node_agent_url() -> str | None:
    """This node's Ray metrics agent endpoint (found once per process)."""
    global _agent_url
    if _agent_url is None:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
        if node and node.get("MetricsExportPort"):
            _agent_url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return _agent_url


async def exposition() -> str:
    """Our metrics, then the node agent's (Serve replicas, vLLM engines); the agent's part is
    left out, with a comment saying so, when it does not answer in time."""
    import httpx

    ours = generate_latest(REGISTRY).decode()
    url = _node_agent_url()
    if not url:
        return ours + "# ray metrics agent: not found on this node\n"
    try:
        async with httpx.AsyncClient(timeout=_AGENT_TIMEOUT_S) as client:
            r = await client.get(url)
        r.raise_for_status()
        return ours + r.text
    except httpx.HTTPError as e:
        _log.warning("ray metrics agent at %s did not answer: %r", url, e)
        return ours + "# ray metrics agent: no answer\n"
