"""The kiosk agent as a service: commands over MQTT, status and Last Will."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support import BrokerEndpoint, Proc, wait_for

from vitals_contract import Command, CommandAction, Leaf, kiosk_topic, utc_now

pytestmark = pytest.mark.e2e
KIOSK = "kiosk-cmd"


class Operator:
    """A plain MQTT client acting as the front desk: sends commands, watches."""

    def __init__(self, broker: BrokerEndpoint) -> None:
        self.root = broker.root
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"op-{uuid.uuid4().hex[:6]}"
        )
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(f"{self.root}/kiosk/{KIOSK}/#", qos=1)
        assert ready.wait(5)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        leaf = msg.topic.split(f"/kiosk/{KIOSK}/", 1)[1]
        if leaf == "command":
            return  # our own commands, some deliberately malformed
        self.messages.append((leaf, json.loads(msg.payload)))

    def of(self, leaf: str) -> list[dict[str, Any]]:
        return [m for lf, m in list(self.messages) if lf == leaf]

    def send(self, action: CommandAction, **fields: Any) -> str:
        command = Command(
            command_id=uuid.uuid4().hex[:12],
            action=action,
            issued_at=utc_now(),
            **fields,
        )
        self.raw(command.to_bytes())
        return command.command_id

    def raw(self, payload: bytes) -> None:
        topic = kiosk_topic(KIOSK, Leaf.COMMAND, self.root)
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def result(self, command_id: str) -> dict[str, Any] | None:
        return next(
            (r for r in self.of("command/result") if r["command_id"] == command_id),
            None,
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def agent(amqtt_broker: BrokerEndpoint, tmp_path: Path) -> Iterator[Proc]:
    env = {
        "KIOSK_KIOSK_ID": KIOSK,
        "KIOSK_CAMERA": "synthetic",
        "KIOSK_MQTT__PORT": str(amqtt_broker.port),
        "KIOSK_MQTT__ROOT_TOPIC": amqtt_broker.root,
        "KIOSK_OUTBOX_PATH": str(tmp_path / "outbox.db"),
        "KIOSK_AUTO_SCAN": "false",
        "KIOSK_HEARTBEAT_SECONDS": "1",
    }
    proc = Proc("agent", ["kiosk_agent.cli", "run"], env, tmp_path).start()
    yield proc
    proc.stop()


@pytest.fixture
def operator(amqtt_broker: BrokerEndpoint) -> Iterator[Operator]:
    op = Operator(amqtt_broker)
    yield op
    op.close()


def test_commands_are_acknowledged_and_bad_ones_never_crash(
    agent: Proc, operator: Operator
) -> None:
    assert wait_for(
        lambda: any(s["state"] == "online" for s in operator.of("status")), 20
    ), agent.log_tail()
    online = next(s for s in operator.of("status") if s["state"] == "online")
    assert "commands" in online["capabilities"]
    assert wait_for(
        lambda: any(h["camera"] == "ok" for h in operator.of("heartbeat")), 30
    )

    ping = operator.send(CommandAction.PING)
    assert wait_for(lambda: operator.result(ping) is not None, 10)
    assert operator.result(ping)["ok"] is True  # type: ignore[index]

    start = operator.send(CommandAction.START_SCAN, patient_ref="MRN-0042")
    assert wait_for(lambda: operator.result(start) is not None, 10)
    assert operator.result(start)["ok"] is True  # type: ignore[index]
    assert wait_for(
        lambda: any(e["state"] == "scanning" for e in operator.of("events")), 15
    )
    scanning = next(e for e in operator.of("events") if e["state"] == "scanning")
    assert scanning["patient_ref"] == "MRN-0042"

    again = operator.send(CommandAction.START_SCAN)
    cancel = operator.send(CommandAction.CANCEL_SCAN)
    assert wait_for(lambda: operator.result(cancel) is not None, 10)
    assert operator.result(again)["error"] == "a scan is already running"  # type: ignore[index]
    assert operator.result(cancel)["ok"] is True  # type: ignore[index]
    assert wait_for(
        lambda: any(e["state"] == "aborted" for e in operator.of("events")), 10
    )

    bad_value = operator.send(CommandAction.SET, args={"scan_seconds": 9999})
    unknown = operator.send(CommandAction.SET, args={"kiosk_id": "evil"})
    good = operator.send(
        CommandAction.SET, args={"scan_seconds": 20, "auto_scan": False}
    )
    operator.raw(b"{not json")
    operator.raw(
        json.dumps(
            {"v": 1, "kind": "command", "command_id": "x1", "action": "reboot"}
        ).encode()
    )
    assert wait_for(lambda: operator.result(good) is not None, 10)
    assert "within" in operator.result(bad_value)["error"]  # type: ignore[index]
    assert "cannot be changed" in operator.result(unknown)["error"]  # type: ignore[index]
    assert operator.result(good)["ok"] is True  # type: ignore[index]
    assert wait_for(
        lambda: (
            len(
                [
                    r
                    for r in operator.of("command/result")
                    if r["command_id"] == "unknown"
                ]
            )
            == 2
        ),
        10,
    )

    last = operator.send(CommandAction.PING)
    assert wait_for(lambda: operator.result(last) is not None, 10), (
        "agent stopped answering"
    )
    assert agent.popen is not None
    assert agent.popen.poll() is None


def test_last_will_marks_a_killed_kiosk_offline(
    agent: Proc, operator: Operator
) -> None:
    assert wait_for(
        lambda: any(s["state"] == "online" for s in operator.of("status")), 20
    )
    agent.kill()
    assert wait_for(lambda: operator.of("status")[-1]["state"] == "offline", 90)


def test_missing_camera_is_reported_and_retried(
    amqtt_broker: BrokerEndpoint, operator: Operator, tmp_path: Path
) -> None:
    env = {
        "KIOSK_KIOSK_ID": KIOSK,
        "KIOSK_CAMERA": str(tmp_path / "no-such-camera.avi"),
        "KIOSK_MQTT__PORT": str(amqtt_broker.port),
        "KIOSK_MQTT__ROOT_TOPIC": amqtt_broker.root,
        "KIOSK_OUTBOX_PATH": str(tmp_path / "outbox.db"),
        "KIOSK_HEARTBEAT_SECONDS": "1",
    }
    proc = Proc("agent", ["kiosk_agent.cli", "run"], env, tmp_path).start()
    try:
        assert wait_for(
            lambda: any(h["camera"] == "missing" for h in operator.of("heartbeat")), 20
        ), proc.log_tail()
        assert wait_for(lambda: "retrying in" in proc.log_tail(), 10)
        assert proc.popen is not None
        assert proc.popen.poll() is None
    finally:
        proc.stop()
