"""The kiosk agent: camera to vital signs to MQTT, with a durable outbox."""

__version__ = "0.1.0"
