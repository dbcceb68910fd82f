"""The bridge's Prometheus metrics (served at ``/metrics``)."""

from __future__ import annotations

CREATION_FAILURES = ("retries_exhausted", "error", "shutdown")  # reasons of runbooks_bridge_creations_failed


class BridgeMetrics:
    """Counters and a latency histogram in their own registry (one per app, so tests do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        ns = "runbooks_bridge"
        self.notifications = Counter(f"{ns}_notifications_received", "Accepted webhook notifications.",
                                     registry=self.registry)
        self.alerts = Counter(f"{ns}_alerts_received", "Alerts in accepted notifications.", ["status"],
                              registry=self.registry)
        self.deduplicated = Counter(f"{ns}_alerts_deduplicated", "Alert notifications that were repeats of one "
                                    "that already started a run.", registry=self.registry)
        self.runs = Counter(f"{ns}_runs_created", "Flow runs created.", ["deployment", "route", "approval"],
                            registry=self.registry)
        self.skipped = Counter(f"{ns}_alerts_skipped", "Alerts that started nothing, by reason.", ["reason"],
                               registry=self.registry)
        self.rejected = Counter(f"{ns}_requests_rejected", "Requests refused, by reason.", ["reason"],
                                registry=self.registry)
        self.in_flight = Gauge(f"{ns}_creations_in_flight", "Run creations not finished yet (answered as pending "
                               "or waiting for a retry).", registry=self.registry)
        self.retries = Counter(f"{ns}_creation_retries", "Background run creations that failed and are retried "
                               "(same idempotency key: a retry never makes a second run).", registry=self.registry)
        self.failed = Counter(f"{ns}_creations_failed", "Alerts answered as pending whose run could not be created "
                              "(the next repeat of the notification tries again), by reason.", ["reason"],
                              registry=self.registry)
        self.latency = Histogram(
            f"{ns}_request_duration_seconds", "Time to answer POST /alertmanager.", ["code"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=self.registry,
        )
        for reason in ("unauthorized", "too_large", "invalid", "unavailable"):
            self.rejected.labels(reason)
        for reason in CREATION_FAILURES:
            self.failed.labels(reason)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
