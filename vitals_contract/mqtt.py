"""paho-mqtt client construction shared by the agent and the bridge."""

from __future__ import annotations

import logging
import random
import ssl
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from vitals_contract.settings import MqttSettings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 3.0


def build_client(
    settings: MqttSettings,
    client_id: str,
    *,
    protocol: MQTTProtocolVersion,
) -> mqtt.Client:
    """Create a paho client (callback API 2) with credentials and TLS applied."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        # 3.1.1 keeps the session; MQTT 5 sets an expiry in the CONNECT properties.
        clean_session=False if protocol is not MQTTProtocolVersion.MQTTv5 else None,
    )
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, password)
    if settings.tls_ca_file is not None:
        client.tls_set(
            ca_certs=str(settings.tls_ca_file),
            certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
            keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    return client


def choose_protocol(settings: MqttSettings) -> MQTTProtocolVersion:
    """Pick the protocol: as configured, or MQTT 5 when the broker accepts it.

    With ``auto`` a short probe connection tries MQTT 5; a refusal, no answer or an
    unreachable broker all mean 3.1.1, which every broker we support speaks.
    """
    if settings.protocol == "5":
        return MQTTProtocolVersion.MQTTv5
    if settings.protocol == "3.1.1":
        return MQTTProtocolVersion.MQTTv311
    answered = threading.Event()
    accepted = False

    def on_connect(
        _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        nonlocal accepted
        accepted = not rc.is_failure
        answered.set()

    probe = build_client(settings, "", protocol=MQTTProtocolVersion.MQTTv5)
    probe.on_connect = on_connect
    try:
        probe.connect(settings.host, settings.port, keepalive=10)
        probe.loop_start()
        answered.wait(PROBE_TIMEOUT_SECONDS)
    except (OSError, ssl.SSLError) as exc:
        log.info("MQTT 5 probe could not connect (%s); using 3.1.1", exc)
        return MQTTProtocolVersion.MQTTv311
    finally:
        probe.disconnect()
        probe.loop_stop()
    chosen = MQTTProtocolVersion.MQTTv5 if accepted else MQTTProtocolVersion.MQTTv311
    log.info("broker protocol: %s", "MQTT 5" if accepted else "MQTT 3.1.1")
    return chosen


SESSION_EXPIRY_SECONDS = 7 * 24 * 3600


def connect_kwargs(
    protocol: MQTTProtocolVersion, session_expiry_seconds: int = SESSION_EXPIRY_SECONDS
) -> dict[str, object]:
    """Return ``connect()`` arguments that keep the session across reconnects."""
    if protocol is not MQTTProtocolVersion.MQTTv5:
        return {}
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_seconds
    return {"clean_start": False, "properties": props}


class JitteredBackoff:
    """Bounded exponential back-off with full jitter for paho's reconnect loop.

    paho waits between reconnect attempts without jitter, so a clinic's kiosks that
    lose the broker together would all come back together. Before each wait we set
    paho's delay to a random value in ``[min, min(max, min * 2**n)]`` (the "full
    jitter" scheme); a successful connect starts the sequence over.
    """

    def __init__(self, min_seconds: float, max_seconds: float) -> None:
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self._attempt = 0

    def reset(self) -> None:
        """Start over after a successful connection."""
        self._attempt = 0

    def next_delay(self) -> float:
        """Return the next delay in seconds and advance."""
        ceiling = min(self.max_seconds, self.min_seconds * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return random.uniform(self.min_seconds, ceiling)

    def arm(self, client: mqtt.Client) -> float:
        """Make paho's next reconnect wait a fresh jittered delay; return it."""
        delay = self.next_delay()
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        return delay
