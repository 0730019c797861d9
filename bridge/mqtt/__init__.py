"""The bridge's own asyncio MQTT client (the kiosk agent keeps paho)."""

from bridge.mqtt.client import BrokerRefusedError, Delivery, MqttClient
from bridge.mqtt.codec import V5, V311, ProtocolError, Subscription

__all__ = [
    "V5",
    "V311",
    "BrokerRefusedError",
    "Delivery",
    "MqttClient",
    "ProtocolError",
    "Subscription",
]
