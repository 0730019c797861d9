"""Prometheus metrics of one bridge instance, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class BridgeMetrics:
    """Counters and histograms for ingest, dead letters and the live hub."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "vitals_ingest_messages", "MQTT messages received", ["leaf"], registry=r
        )
        self.readings_stored = Counter(
            "vitals_ingest_readings_stored", "Readings newly committed", registry=r
        )
        self.duplicates = Counter(
            "vitals_ingest_duplicates",
            "Sequenced items already stored (redeliveries)",
            registry=r,
        )
        self.dead_letters = Counter(
            "vitals_ingest_dead_letters", "Items rejected by validation", registry=r
        )
        self.rate_limited = Counter(
            "vitals_ingest_rate_limited",
            "Messages deferred because their kiosk exceeded its rate",
            registry=r,
        )
        self.commit_failures = Counter(
            "vitals_ingest_commit_failures", "Failed batch commits", registry=r
        )
        self.batch_seconds = Histogram(
            "vitals_ingest_batch_seconds", "Time to commit one batch", registry=r
        )
        self.lag_seconds = Histogram(
            "vitals_ingest_lag_seconds",
            "From broker delivery to commit",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.ws_clients = Gauge(
            "vitals_ws_clients", "Connected WebSocket clients", registry=r
        )
        self.ws_dropped = Counter(
            "vitals_ws_dropped_clients", "Clients cut off as too slow", registry=r
        )
        self.alerts = Counter(
            "vitals_alerts", "Alert lifecycle changes", ["kind", "severity"], registry=r
        )
        self.mqtt_connected = Gauge(
            "vitals_mqtt_connected", "1 while connected to the broker", registry=r
        )
