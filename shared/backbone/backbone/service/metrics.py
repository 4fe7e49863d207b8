"""Prometheus metrics shared by all services (one process-wide registry, labelled by service)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests handled.", ["service", "method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency.",
    ["service", "method", "route"],
    buckets=LATENCY_BUCKETS,
)
MODEL_LOADED = Gauge("model_loaded", "1 when the service's model is loaded.", ["service"])
MODEL_INFO = Gauge(
    "model_info", "Loaded model (value 1); labels name and version.", ["service", "name", "version"]
)
MODEL_RELOADS = Counter("model_reloads_total", "Model reloads.", ["service", "outcome"])
KAFKA_UP = Gauge("kafka_reachable", "1 when the Kafka cluster answered the last check.", ["service"])
PREDICTIONS = Counter("predictions_total", "Model predictions served.", ["service", "endpoint"])


def render_metrics() -> tuple[bytes, str]:
    """The process registry in Prometheus text format, with its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
