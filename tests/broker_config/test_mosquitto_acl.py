"""Check broker_config/mosquitto.conf and mosquitto.acl against a real Mosquitto.

The test starts its own Mosquitto on a free loopback port, from the repository's
configuration with the TLS listener removed and temporary paths for the password
file and persistence. It never touches a Mosquitto already running on the machine.

A denied PUBLISH is acknowledged like an allowed one, so every "not delivered" check
first proves the path works with an allowed control message, then waits a bounded
time for the forbidden one.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

REPO_DIR = Path(__file__).resolve().parents[2]
CONFIG_PATH = REPO_DIR / "broker_config" / "mosquitto.conf"
ACL_PATH = REPO_DIR / "broker_config" / "mosquitto.acl"

# Debian installs the broker in /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]
)
MOSQUITTO = shutil.which("mosquitto", path=SEARCH_PATH)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd", path=SEARCH_PATH)

KIOSK_A = "kiosk-a"
KIOSK_B = "kiosk-b"
BRIDGE = "bridge"
OPERATOR = "operator"
USERS = (KIOSK_A, KIOSK_B, BRIDGE, OPERATOR)

# The plain loopback listener kept from mosquitto.conf; any other is removed.
KEPT_LISTENER = "1883 127.0.0.1"
# Options that belong to the listener above them (mosquitto.conf(5)).
LISTENER_OPTIONS = frozenset(
    {
        "bind_interface",
        "cafile",
        "capath",
        "certfile",
        "ciphers",
        "ciphers_tls1.3",
        "crlfile",
        "dhparamfile",
        "http_dir",
        "keyfile",
        "max_connections",
        "mount_point",
        "protocol",
        "psk_hint",
        "require_certificate",
        "socket_domain",
        "tls_engine",
        "tls_keyform",
        "tls_version",
        "use_identity_as_username",
        "use_subject_as_username",
        "use_username_as_clientid",
    }
)

BROKER_START_SECONDS = 10.0
CONNECT_SECONDS = 5.0
DELIVERY_SECONDS = 5.0
# How long a forbidden message is waited for, once a control message got through.
ABSENCE_SECONDS = 1.0
# MQTT 5 reason code "Not authorized" in a PUBACK.
NOT_AUTHORIZED = 0x87


def password_of(user: str) -> str:
    """Return the throwaway test password of ``user``."""
    return f"{user}-test-password"


def kiosk_topic(kiosk_id: str, leaf: str) -> str:
    """Build a topic of the v1 kiosk subtree."""
    return f"vitals/v1/kiosk/{kiosk_id}/{leaf}"


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def adapt_config(
    text: str, *, port: int, password_file: Path, persistence_dir: Path
) -> str:
    """Rewrite mosquitto.conf for a throwaway broker on ``port``."""
    lines: list[str] = []
    in_removed_listener = False
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        option, _, value = line.partition(" ")

        # Keep the loopback listener on our port, drop the TLS one with its options.
        if option == "listener":
            in_removed_listener = value.strip() != KEPT_LISTENER
            if not in_removed_listener:
                lines.append(f"listener {port} 127.0.0.1")
            continue
        if in_removed_listener and option in LISTENER_OPTIONS:
            continue

        # Point every file at the temporary directory or the repository.
        replacements = {
            "password_file": f"password_file {password_file}",
            "acl_file": f"acl_file {ACL_PATH}",
            "persistence_location": f"persistence_location {persistence_dir}/",
            "log_dest": "log_dest stderr",
        }
        if option == "log_dest" and "log_dest stderr" in lines:
            continue
        lines.append(replacements.get(option, line))

    # Started as root, Mosquitto would switch to the "mosquitto" user and lose
    # access to the private temporary directory.
    if os.geteuid() == 0:
        lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    return "\n".join(lines) + "\n"


def write_password_file(path: Path, mosquitto_passwd: str) -> None:
    """Create a Mosquitto password file holding every test user."""
    for index, user in enumerate(USERS):
        create = ["-c"] if index == 0 else []
        subprocess.run(
            [mosquitto_passwd, "-b", *create, str(path), user, password_of(user)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    path.chmod(0o600)


@dataclass(frozen=True, slots=True)
class RunningBroker:
    """Address and log of the test's own Mosquitto."""

    port: int
    log_path: Path

    def log_tail(self) -> str:
        """Return the end of the broker's log, for failure messages."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])


def wait_for_listener(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Wait until the broker accepts TCP connections, or fail with its log."""
    deadline = time.monotonic() + BROKER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"mosquitto exited with {process.returncode}:\n{log.read_text()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"mosquitto did not listen on {port}:\n{log.read_text()}")


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """Run a private Mosquitto with the repository's configuration."""
    if MOSQUITTO is None or MOSQUITTO_PASSWD is None:
        pytest.skip(
            "mosquitto and mosquitto_passwd not installed (package 'mosquitto')"
        )

    # Prepare the password file and the adapted configuration.
    work_dir = tmp_path_factory.mktemp("mosquitto")
    password_file = work_dir / "passwords"
    write_password_file(password_file, MOSQUITTO_PASSWD)
    persistence_dir = work_dir / "data"
    persistence_dir.mkdir()
    port = free_port()
    config_path = work_dir / "mosquitto.conf"
    config_path.write_text(
        adapt_config(
            CONFIG_PATH.read_text(),
            port=port,
            password_file=password_file,
            persistence_dir=persistence_dir,
        )
    )

    # Start it and wait for the listener.
    log_path = work_dir / "mosquitto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [MOSQUITTO, "-c", str(config_path)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_listener(process, port, log_path)
        yield RunningBroker(port=port, log_path=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class TestClient:
    """A paho-mqtt 2.x client on its own network thread, with waitable results."""

    __test__ = False  # not a test class, despite its name

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None = None,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    ) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:12]}",
            protocol=protocol,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack = threading.Event()
        self.connect_reason: ReasonCode | None = None
        self._lock = threading.Lock()
        self._expected: dict[bytes, threading.Event] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._suback_events: dict[int, threading.Event] = {}
        self.puback_reasons: dict[int, ReasonCode] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _p: Any,
    ) -> None:
        self.connect_reason = reason
        self.connack.set()

    def _on_message(
        self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage
    ) -> None:
        with self._lock:
            event = self._expected.get(bytes(msg.payload))
        if event is not None:
            event.set()

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _p: Any,
    ) -> None:
        with self._lock:
            self._subacks[mid] = reasons
            event = self._suback_events.setdefault(mid, threading.Event())
        event.set()

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason: ReasonCode,
        _p: Any,
    ) -> None:
        self.puback_reasons[mid] = reason

    def connect(self) -> ReasonCode:
        """Connect, wait for the CONNACK and return its reason code."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self.connack.wait(CONNECT_SECONDS), "no CONNACK"
        assert self.connect_reason is not None
        return self.connect_reason

    def subscribe(self, topic_filter: str) -> ReasonCode:
        """Subscribe at QoS 1, wait for the SUBACK and return its reason code."""
        result, mid = self.client.subscribe(topic_filter, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert mid is not None
        with self._lock:
            event = self._suback_events.setdefault(mid, threading.Event())
        assert event.wait(DELIVERY_SECONDS), f"no SUBACK for {topic_filter}"
        return self._subacks[mid][0]

    def expect(self, payload: bytes) -> threading.Event:
        """Return an event set when a message with ``payload`` arrives."""
        with self._lock:
            return self._expected.setdefault(payload, threading.Event())

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1, wait for the PUBACK and return its reason code."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=DELIVERY_SECONDS)
        assert info.is_published(), f"no PUBACK for {topic}"
        return self.puback_reasons[info.mid]

    def close(self) -> None:
        """Disconnect and stop the network thread (also after a refused login)."""
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def connected(
    mosquitto: RunningBroker,
    username: str | None,
    password: str | None = None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
) -> Iterator[TestClient]:
    """Yield a client logged in as ``username``; fail if the login is refused."""
    if password is None and username is not None:
        password = password_of(username)
    client = TestClient(mosquitto.port, username, password, protocol)
    try:
        reason = client.connect()
        assert not reason.is_failure, (
            f"{username} refused: {reason}\n{mosquitto.log_tail()}"
        )
        yield client
    finally:
        client.close()


def unique_payload() -> bytes:
    """Return a payload no other test publishes."""
    return uuid.uuid4().hex.encode()


# --- Authentication ------------------------------------------------------------------


@pytest.mark.parametrize(
    "protocol",
    [MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311],
    ids=["mqtt5", "mqtt311"],
)
@pytest.mark.parametrize(
    ("username", "password"),
    [
        pytest.param(None, None, id="anonymous"),
        pytest.param("stranger", "whatever", id="unknown-user"),
        pytest.param(KIOSK_A, "wrong-password", id="wrong-password"),
    ],
)
def test_login_is_refused(
    mosquitto: RunningBroker,
    protocol: MQTTProtocolVersion,
    username: str | None,
    password: str | None,
) -> None:
    """Refuse anonymous clients, unknown users and wrong passwords."""
    client = TestClient(mosquitto.port, username, password, protocol)
    try:
        reason = client.connect()
    finally:
        client.close()

    assert reason.is_failure, f"login accepted: {reason}"


# --- Allowed paths -------------------------------------------------------------------


def test_kiosk_readings_reach_the_bridge(mosquitto: RunningBroker) -> None:
    """Deliver a kiosk's reading on its own topic to the bridge."""
    with connected(mosquitto, BRIDGE) as bridge, connected(mosquitto, KIOSK_A) as kiosk:
        assert not bridge.subscribe("vitals/v1/kiosk/+/readings").is_failure
        payload = unique_payload()
        arrived = bridge.expect(payload)

        reason = kiosk.publish(kiosk_topic(KIOSK_A, "readings"), payload)

        assert not reason.is_failure
        assert arrived.wait(DELIVERY_SECONDS), mosquitto.log_tail()


def test_operator_command_reaches_the_kiosk(mosquitto: RunningBroker) -> None:
    """Deliver an operator's command to the kiosk it is addressed to."""
    with (
        connected(mosquitto, KIOSK_A) as kiosk,
        connected(mosquitto, OPERATOR) as operator,
    ):
        assert not kiosk.subscribe(kiosk_topic(KIOSK_A, "command")).is_failure
        payload = unique_payload()
        arrived = kiosk.expect(payload)

        operator.publish(kiosk_topic(KIOSK_A, "command"), payload)

        assert arrived.wait(DELIVERY_SECONDS), mosquitto.log_tail()


def test_bridge_confirmation_reaches_the_kiosk(mosquitto: RunningBroker) -> None:
    """Deliver the bridge's commit confirmation to the kiosk."""
    with connected(mosquitto, KIOSK_A) as kiosk, connected(mosquitto, BRIDGE) as bridge:
        assert not kiosk.subscribe(kiosk_topic(KIOSK_A, "confirm")).is_failure
        payload = unique_payload()
        arrived = kiosk.expect(payload)

        bridge.publish(kiosk_topic(KIOSK_A, "confirm"), payload)

        assert arrived.wait(DELIVERY_SECONDS), mosquitto.log_tail()


# --- Denied paths --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ForgeryCase:
    """A publish the ACL must drop, and an allowed one on the same path."""

    publisher: str
    forged_topic: str
    control_publisher: str
    control_topic: str
    subscriber: str
    subscription: str


FORGERY_CASES = {
    "kiosk-writes-other-kiosk-readings": ForgeryCase(
        publisher=KIOSK_A,
        forged_topic=kiosk_topic(KIOSK_B, "readings"),
        control_publisher=KIOSK_A,
        control_topic=kiosk_topic(KIOSK_A, "readings"),
        subscriber=BRIDGE,
        subscription="vitals/v1/kiosk/+/readings",
    ),
    "kiosk-commands-other-kiosk": ForgeryCase(
        publisher=KIOSK_A,
        forged_topic=kiosk_topic(KIOSK_B, "command"),
        control_publisher=OPERATOR,
        control_topic=kiosk_topic(KIOSK_B, "command"),
        subscriber=KIOSK_B,
        subscription=kiosk_topic(KIOSK_B, "command"),
    ),
    "kiosk-forges-confirmation": ForgeryCase(
        publisher=KIOSK_A,
        forged_topic=kiosk_topic(KIOSK_B, "confirm"),
        control_publisher=BRIDGE,
        control_topic=kiosk_topic(KIOSK_B, "confirm"),
        subscriber=KIOSK_B,
        subscription=kiosk_topic(KIOSK_B, "confirm"),
    ),
    "operator-writes-readings": ForgeryCase(
        publisher=OPERATOR,
        forged_topic=kiosk_topic(KIOSK_A, "readings"),
        control_publisher=KIOSK_A,
        control_topic=kiosk_topic(KIOSK_A, "readings"),
        subscriber=BRIDGE,
        subscription="vitals/v1/kiosk/+/readings",
    ),
    "kiosk-raises-alert": ForgeryCase(
        publisher=KIOSK_A,
        forged_topic=f"vitals/v1/alerts/{KIOSK_A}",
        control_publisher=BRIDGE,
        control_topic=f"vitals/v1/alerts/{KIOSK_A}",
        subscriber=OPERATOR,
        subscription="vitals/v1/alerts/#",
    ),
}


@pytest.mark.parametrize("case", FORGERY_CASES.values(), ids=FORGERY_CASES.keys())
def test_forbidden_publish_is_not_delivered(
    mosquitto: RunningBroker, case: ForgeryCase
) -> None:
    """Drop a publish outside the publisher's rights; MQTT 5 gets 0x87 back."""
    with (
        connected(mosquitto, case.subscriber) as subscriber,
        connected(mosquitto, case.publisher) as publisher,
        connected(mosquitto, case.control_publisher) as control_publisher,
    ):
        assert not subscriber.subscribe(case.subscription).is_failure
        forged, control = unique_payload(), unique_payload()
        forged_arrived = subscriber.expect(forged)
        control_arrived = subscriber.expect(control)

        # The forged message goes first, so it would arrive before the control.
        forged_reason = publisher.publish(case.forged_topic, forged)
        control_publisher.publish(case.control_topic, control)

        assert control_arrived.wait(DELIVERY_SECONDS), mosquitto.log_tail()
        assert not forged_arrived.wait(ABSENCE_SECONDS), "forbidden publish delivered"
        assert forged_reason.value == NOT_AUTHORIZED


def test_kiosk_cannot_read_other_kiosk_commands(mosquitto: RunningBroker) -> None:
    """Withhold another kiosk's commands, even under a granted subscription."""
    with (
        connected(mosquitto, KIOSK_A) as kiosk,
        connected(mosquitto, OPERATOR) as operator,
    ):
        # Mosquitto grants these subscriptions; the ACL filters each message instead.
        for topic_filter in (
            kiosk_topic(KIOSK_B, "command"),
            "vitals/v1/kiosk/+/command",
            "vitals/v1/#",
            kiosk_topic(KIOSK_A, "command"),
        ):
            kiosk.subscribe(topic_filter)
        other, own = unique_payload(), unique_payload()
        other_arrived = kiosk.expect(other)
        own_arrived = kiosk.expect(own)

        operator.publish(kiosk_topic(KIOSK_B, "command"), other)
        operator.publish(kiosk_topic(KIOSK_A, "command"), own)

        assert own_arrived.wait(DELIVERY_SECONDS), mosquitto.log_tail()
        assert not other_arrived.wait(ABSENCE_SECONDS), "kiosk read another's command"


def test_kiosk_cannot_read_other_kiosk_readings(mosquitto: RunningBroker) -> None:
    """Withhold other kiosks' readings from a kiosk subscribed to all of them."""
    with (
        connected(mosquitto, KIOSK_A) as spy,
        connected(mosquitto, KIOSK_B) as kiosk,
        connected(mosquitto, BRIDGE) as bridge,
    ):
        spy.subscribe("vitals/v1/kiosk/+/readings")
        assert not bridge.subscribe("vitals/v1/kiosk/+/readings").is_failure
        payload = unique_payload()
        spied = spy.expect(payload)
        stored = bridge.expect(payload)

        kiosk.publish(kiosk_topic(KIOSK_B, "readings"), payload)

        assert stored.wait(DELIVERY_SECONDS), mosquitto.log_tail()
        assert not spied.wait(ABSENCE_SECONDS), "kiosk read another kiosk's readings"
