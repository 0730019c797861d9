"""The agent's MQTT link: publishes the outbox, applies confirmations, takes commands.

paho runs its network loop in its own thread and reconnects with bounded back-off; a
second thread, the publisher, moves due outbox rows to the broker. Neither blocks the
capture loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from kiosk_agent import __version__
from kiosk_agent.config import AgentSettings
from kiosk_agent.outbox import Outbox, Pending
from vitals_contract import (
    Command,
    CommandResult,
    CommitConfirmation,
    ContractError,
    KioskState,
    KioskStatus,
    Leaf,
    Reading,
    ReadingsMessage,
    ScanEvent,
    kiosk_topic,
    parse_payload,
    utc_now,
)
from vitals_contract.messages import Message
from vitals_contract.mqtt import (
    JitteredBackoff,
    build_client,
    choose_protocol,
    connect_kwargs,
)

log = logging.getLogger(__name__)

RECONNECT_MIN_SECONDS = 1
RECONNECT_MAX_SECONDS = 30
PUBLISH_POLL_SECONDS = 0.25
PUBLISH_BATCH = 50
CAPABILITIES = ["readings", "scan_events", "commands", "heartbeat"]

CommandHandler = Callable[[Command], str | None]  # returns an error text or None


class MqttLink:
    """Connection to the broker on behalf of one kiosk."""

    def __init__(
        self, settings: AgentSettings, outbox: Outbox, on_command: CommandHandler
    ) -> None:
        self._settings = settings
        self._outbox = outbox
        self._on_command = on_command
        self._root = settings.mqtt.root_topic
        self._kiosk = settings.kiosk_id
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._client: mqtt.Client | None = None
        self._publisher: threading.Thread | None = None
        self.confirmed_through = -1
        self._backoff = JitteredBackoff(RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS)

    @property
    def connected(self) -> bool:
        """Tell whether the broker connection is up."""
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background and start publishing."""
        protocol = choose_protocol(self._settings.mqtt)
        client = build_client(self._settings.mqtt, self._kiosk, protocol=protocol)
        self._backoff.arm(client)
        client.on_connect_fail = self._on_connect_fail
        offline = KioskStatus(
            kiosk_id=self._kiosk, state=KioskState.OFFLINE, at=utc_now()
        )
        client.will_set(
            self._topic(Leaf.STATUS), offline.to_bytes(), qos=1, retain=True
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.message_callback_add(self._topic(Leaf.CONFIRM), self._on_confirm)
        client.message_callback_add(self._topic(Leaf.COMMAND), self._on_command_msg)
        mqtt_cfg = self._settings.mqtt
        client.connect_async(
            mqtt_cfg.host,
            mqtt_cfg.port,
            keepalive=mqtt_cfg.keepalive_seconds,
            **connect_kwargs(protocol),  # type: ignore[arg-type]
        )
        client.loop_start()
        self._client = client
        self._publisher = threading.Thread(
            target=self._publish_loop, name="mqtt-publisher", daemon=True
        )
        self._publisher.start()

    def stop(self) -> None:
        """Announce offline, disconnect and stop the threads."""
        self._stop.set()
        self._wake.set()
        if self._publisher is not None:
            self._publisher.join(timeout=5)
        if self._client is not None:
            if self.connected:
                offline = KioskStatus(
                    kiosk_id=self._kiosk, state=KioskState.OFFLINE, at=utc_now()
                )
                info = self._client.publish(
                    self._topic(Leaf.STATUS), offline.to_bytes(), qos=1, retain=True
                )
                info.wait_for_publish(timeout=2)
            self._client.disconnect()
            self._client.loop_stop()

    def wake(self) -> None:
        """Ask the publisher to look at the outbox now."""
        self._wake.set()

    def publish_now(self, leaf: Leaf, message: Message, *, qos: int = 0) -> None:
        """Send a best-effort message (heartbeat) that does not go through the outbox."""
        if self._client is not None and self.connected:
            self._client.publish(self._topic(leaf), message.to_bytes(), qos=qos)

    # -- paho callbacks ---------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: object,
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused connection: %s", reason)
            return
        online = KioskStatus(
            kiosk_id=self._kiosk,
            state=KioskState.ONLINE,
            at=utc_now(),
            agent_version=__version__,
            capabilities=CAPABILITIES,
        )
        self._backoff.reset()
        self._backoff.arm(client)
        client.publish(self._topic(Leaf.STATUS), online.to_bytes(), qos=1, retain=True)
        client.subscribe(
            [(self._topic(Leaf.CONFIRM), 1), (self._topic(Leaf.COMMAND), 1)]
        )
        # Whatever was in flight on the old connection may be lost: replay it all.
        self._outbox.replay_all()
        self._connected.set()
        self._wake.set()
        log.info("connected to broker as %s", self._kiosk)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _props: object,
    ) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            delay = self._backoff.arm(client)
            log.warning(
                "lost broker connection (%s); retrying in %.1f s", reason, delay
            )

    def _on_connect_fail(self, client: mqtt.Client, _userdata: object) -> None:
        delay = self._backoff.arm(client)
        log.warning("%s: broker unreachable; retrying in %.1f s", self._kiosk, delay)

    def _on_confirm(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            confirmation = parse_payload(Leaf.CONFIRM, msg.payload, self._kiosk)
        except ContractError as exc:
            log.warning("ignored malformed confirmation: %s", exc)
            return
        assert isinstance(confirmation, CommitConfirmation)
        self.confirmed_through = max(self.confirmed_through, confirmation.through)
        released = self._outbox.release(confirmation.through)
        log.debug(
            "bridge confirmed through %d, released %d", confirmation.through, released
        )

    def _on_command_msg(
        self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage
    ) -> None:
        try:
            command = parse_payload(Leaf.COMMAND, msg.payload)
        except ContractError as exc:
            log.warning(
                "rejected malformed command (%d bytes): %s", len(msg.payload), exc
            )
            self._reply("unknown", f"malformed command: {exc}")
            return
        assert isinstance(command, Command)
        try:
            error = self._on_command(command)
        except Exception as exc:  # a handler bug must not kill the network thread
            log.exception("command %s failed", command.action.value)
            error = f"internal error: {type(exc).__name__}"
        self._reply(command.command_id, error)

    def _reply(self, command_id: str, error: str | None) -> None:
        result = CommandResult(
            kiosk_id=self._kiosk,
            command_id=command_id[:64],
            ok=error is None,
            at=utc_now(),
            error=error[:200] if error else None,
        )
        assert self._client is not None
        self._client.publish(self._topic(Leaf.COMMAND_RESULT), result.to_bytes(), qos=1)

    # -- publisher thread ---------------------------------------------------------

    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(PUBLISH_POLL_SECONDS)
            self._wake.clear()
            if not self.connected or self._client is None:
                continue
            rows = self._outbox.due(
                self._settings.confirm_timeout_seconds, PUBLISH_BATCH
            )
            if not rows:
                continue
            floor = self._outbox.floor()
            for row in rows:
                if row.sends:
                    log.info("resending seqs %d..%d", row.first_seq, row.last_seq)
                leaf, message = self._materialise(row, floor)
                self._client.publish(self._topic(leaf), message.to_bytes(), qos=1)
            self._outbox.mark_sent([r.first_seq for r in rows])
            if len(rows) == PUBLISH_BATCH:
                self._wake.set()

    def _materialise(self, row: Pending, floor: int) -> tuple[Leaf, Message]:
        now = utc_now()
        if row.leaf == "readings":
            readings = [Reading.model_validate(r) for r in row.body]
            return Leaf.READINGS, ReadingsMessage(
                kiosk_id=self._kiosk, sent_at=now, floor=floor, readings=readings
            )
        event = ScanEvent.model_validate({**row.body, "floor": floor})
        return Leaf.EVENTS, event

    def _topic(self, leaf: Leaf) -> str:
        return kiosk_topic(self._kiosk, leaf, self._root)
