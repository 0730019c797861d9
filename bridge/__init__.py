"""The bridge: MQTT ingest, SQL store, alerts and the live WebSocket hub."""

__version__ = "0.1.0"
