"""Check broker_config/amqtt-*.yaml against amqtt 0.12.1 started in-process.

Each broker runs on its own event loop in a background thread, on free loopback
ports; the paho-mqtt 2.x clients (MQTT 3.1.1, the only version amqtt speaks) run
their own network threads.

amqtt acknowledges a denied PUBLISH like an allowed one and drops it, so every "not
delivered" check first proves the path works with an allowed control message, then
waits a bounded time for the forbidden one.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

amqtt_broker = pytest.importorskip("amqtt.broker", reason="amqtt not installed")
argon2 = pytest.importorskip(
    "pwdlib.hashers.argon2", reason="pwdlib (an amqtt dependency) not installed"
)

pytestmark = [
    # amqtt 0.12.1 reads subscribe rules only from the deprecated "acl" key.
    pytest.mark.filterwarnings(
        "ignore:The 'acl' option is deprecated:DeprecationWarning"
    ),
]

REPO_DIR = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_DIR / "broker_config" / "amqtt-demo.yaml"
SECURE_CONFIG = REPO_DIR / "broker_config" / "amqtt-secure.yaml"

FILE_AUTH = "amqtt.plugins.authentication.FileAuthPlugin"
ANONYMOUS_AUTH = "amqtt.plugins.authentication.AnonymousAuthPlugin"
TOPIC_ACL = "amqtt.plugins.topic_checking.TopicAccessControlListPlugin"

# The example kiosks of amqtt-secure.yaml.
KIOSK_A = "kiosk-001"
KIOSK_B = "kiosk-002"
BRIDGE = "bridge"
OPERATOR = "operator"
USERS = (KIOSK_A, KIOSK_B, BRIDGE, OPERATOR)

BROKER_START_SECONDS = 10.0
CONNECT_SECONDS = 5.0
DELIVERY_SECONDS = 5.0
# How long a forbidden message is waited for, once a control message got through.
ABSENCE_SECONDS = 1.0
# SUBACK return code of a refused subscription (MQTT 3.1.1, section 3.9.3).
SUBACK_FAILURE = 0x80


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


def unique_payload() -> bytes:
    """Return a payload no other test publishes."""
    return uuid.uuid4().hex.encode()


def load_config(path: Path) -> dict[str, Any]:
    """Read one of the repository's amqtt YAML files."""
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict)
    return config


@contextmanager
def running_broker(config: dict[str, Any]) -> Iterator[None]:
    """Run an amqtt broker with ``config`` on an event loop in a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="amqtt-test", daemon=True)
    thread.start()

    async def start() -> Any:
        broker = amqtt_broker.Broker(copy.deepcopy(config))
        await broker.start()
        return broker

    try:
        broker = asyncio.run_coroutine_threadsafe(start(), loop).result(
            timeout=BROKER_START_SECONDS
        )
        try:
            yield
        finally:
            asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(
                timeout=BROKER_START_SECONDS
            )
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=BROKER_START_SECONDS)
        loop.close()


def write_password_file(path: Path) -> None:
    """Write an amqtt password file (Argon2 hashes) holding every test user."""
    hasher = argon2.Argon2Hasher()
    lines = [f"{user}:{hasher.hash(password_of(user))}" for user in USERS]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def make_certificate(work_dir: Path) -> tuple[Path, Path] | None:
    """Create a self-signed certificate for 127.0.0.1, or None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = work_dir / "broker.crt", work_dir / "broker.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


@dataclass(frozen=True, slots=True)
class SecureBroker:
    """Ports of the broker running amqtt-secure.yaml."""

    port: int
    tls_port: int | None
    ca_file: Path | None


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """Run amqtt-secure.yaml with temporary credentials and free ports."""
    work_dir = tmp_path_factory.mktemp("amqtt")
    password_file = work_dir / "amqtt-passwd"
    write_password_file(password_file)

    # Same configuration, with test ports, password file and certificate.
    config = load_config(SECURE_CONFIG)
    port = free_port()
    config["listeners"]["default"]["bind"] = f"127.0.0.1:{port}"
    config["plugins"][FILE_AUTH]["password_file"] = str(password_file)
    tls_port: int | None = None
    certificate = make_certificate(work_dir)
    if certificate is None:
        del config["listeners"]["tls"]
    else:
        tls_port = free_port()
        tls = config["listeners"]["tls"]
        tls.update(
            bind=f"127.0.0.1:{tls_port}",
            certfile=str(certificate[0]),
            keyfile=str(certificate[1]),
        )

    with running_broker(config):
        yield SecureBroker(
            port=port,
            tls_port=tls_port,
            ca_file=certificate[0] if certificate else None,
        )


class TestClient:
    """A paho-mqtt 2.x client on its own network thread, with waitable results."""

    __test__ = False  # not a test class, despite its name

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:12]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file is not None:
            self.client.tls_set(
                ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT
            )
        self.connack = threading.Event()
        self.connect_reason: ReasonCode | None = None
        self._lock = threading.Lock()
        self._expected: dict[bytes, threading.Event] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._suback_events: dict[int, threading.Event] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

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

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the PUBACK (sent even when denied)."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=DELIVERY_SECONDS)
        assert info.is_published(), f"no PUBACK for {topic}"

    def close(self) -> None:
        """Disconnect and stop the network thread (also after a refused login)."""
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def connected(
    port: int,
    username: str | None,
    password: str | None = None,
    ca_file: Path | None = None,
) -> Iterator[TestClient]:
    """Yield a client logged in as ``username``; fail if the login is refused."""
    if password is None and username is not None:
        password = password_of(username)
    client = TestClient(port, username, password, ca_file)
    try:
        reason = client.connect()
        assert not reason.is_failure, f"{username} refused: {reason}"
        yield client
    finally:
        client.close()


def login_reason(port: int, username: str | None, password: str | None) -> ReasonCode:
    """Try to log in and return the CONNACK reason code."""
    client = TestClient(port, username, password)
    try:
        return client.connect()
    finally:
        client.close()


# --- amqtt-demo.yaml -----------------------------------------------------------------


def test_demo_config_relays_anonymous_qos1() -> None:
    """Load the demo config and relay one QoS 1 message between anonymous clients."""
    config = load_config(DEMO_CONFIG)
    port = free_port()
    config["listeners"]["default"]["bind"] = f"127.0.0.1:{port}"

    with (
        running_broker(config),
        connected(port, None) as subscriber,
        connected(port, None) as publisher,
    ):
        assert subscriber.subscribe("vitals/v1/kiosk/+/readings").value == 1
        payload = unique_payload()
        arrived = subscriber.expect(payload)

        publisher.publish(kiosk_topic("demo-kiosk", "readings"), payload)

        assert arrived.wait(DELIVERY_SECONDS)


def test_demo_config_binds_loopback_only() -> None:
    """Keep the demo broker's single listener on 127.0.0.1."""
    listeners = load_config(DEMO_CONFIG)["listeners"]

    assert list(listeners) == ["default"]
    assert listeners["default"]["bind"].startswith("127.0.0.1:")


# --- amqtt-secure.yaml: authentication ------------------------------------------------


@pytest.mark.parametrize(
    ("username", "password"),
    [
        pytest.param(None, None, id="anonymous"),
        # The pitfall: AnonymousAuthPlugin alone would let this one in.
        pytest.param("stranger", "whatever", id="unknown-user"),
        pytest.param(KIOSK_A, "wrong-password", id="wrong-password"),
        pytest.param(KIOSK_A, None, id="no-password"),
    ],
)
def test_secure_login_is_refused(
    secure_broker: SecureBroker, username: str | None, password: str | None
) -> None:
    """Refuse anonymous clients, unknown users and wrong or missing passwords."""
    reason = login_reason(secure_broker.port, username, password)

    assert reason.is_failure, f"login accepted: {reason}"


def test_anonymous_plugin_alone_admits_any_username() -> None:
    """Show why amqtt-secure.yaml relies on FileAuthPlugin (upstream pitfall).

    With only AnonymousAuthPlugin and allow_anonymous false, amqtt 0.12.1 accepts
    any client that sends a username, whatever the password. If this test fails,
    amqtt changed and the comment in amqtt-secure.yaml needs updating.
    """
    config = load_config(SECURE_CONFIG)
    port = free_port()
    config["listeners"] = {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}
    config["plugins"] = {ANONYMOUS_AUTH: {"allow_anonymous": False}}

    with running_broker(config):
        anonymous = login_reason(port, None, None)
        stranger = login_reason(port, "stranger", "whatever")

    assert anonymous.is_failure
    assert not stranger.is_failure


def test_secure_tls_listener_accepts_kiosk(secure_broker: SecureBroker) -> None:
    """Log a kiosk in over the TLS listener, the certificate checked."""
    if secure_broker.tls_port is None:
        pytest.skip("openssl not installed: no test certificate for the TLS listener")

    with connected(secure_broker.tls_port, KIOSK_A, ca_file=secure_broker.ca_file):
        pass


# --- amqtt-secure.yaml: topic ACL -----------------------------------------------------


def test_kiosk_readings_reach_the_bridge(secure_broker: SecureBroker) -> None:
    """Deliver a kiosk's reading on its own topic to the bridge."""
    port = secure_broker.port
    with connected(port, BRIDGE) as bridge, connected(port, KIOSK_A) as kiosk:
        assert bridge.subscribe("vitals/v1/kiosk/+/readings").value == 1
        payload = unique_payload()
        arrived = bridge.expect(payload)

        kiosk.publish(kiosk_topic(KIOSK_A, "readings"), payload)

        assert arrived.wait(DELIVERY_SECONDS)


def test_operator_command_reaches_the_kiosk(secure_broker: SecureBroker) -> None:
    """Deliver an operator's command to the kiosk it is addressed to."""
    port = secure_broker.port
    with connected(port, KIOSK_A) as kiosk, connected(port, OPERATOR) as operator:
        assert kiosk.subscribe(kiosk_topic(KIOSK_A, "command")).value == 1
        payload = unique_payload()
        arrived = kiosk.expect(payload)

        operator.publish(kiosk_topic(KIOSK_A, "command"), payload)

        assert arrived.wait(DELIVERY_SECONDS)


@pytest.mark.parametrize(
    ("username", "topic_filter"),
    [
        pytest.param(
            KIOSK_A, kiosk_topic(KIOSK_B, "command"), id="other-kiosk-command"
        ),
        pytest.param(KIOSK_A, "vitals/v1/kiosk/+/command", id="all-commands"),
        pytest.param(KIOSK_A, "vitals/v1/kiosk/+/readings", id="all-readings"),
        pytest.param(KIOSK_A, "#", id="everything"),
        pytest.param(BRIDGE, "vitals/v1/kiosk/+/command", id="bridge-commands"),
    ],
)
def test_subscription_outside_rights_is_refused(
    secure_broker: SecureBroker, username: str, topic_filter: str
) -> None:
    """Answer 0x80 to a subscription the ACL does not grant."""
    with connected(secure_broker.port, username) as client:
        reason = client.subscribe(topic_filter)

    assert reason.value == SUBACK_FAILURE


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
def test_forbidden_publish_is_acked_but_not_delivered(
    secure_broker: SecureBroker, case: ForgeryCase
) -> None:
    """Drop a publish outside the publisher's rights, although it got a PUBACK."""
    port = secure_broker.port
    with (
        connected(port, case.subscriber) as subscriber,
        connected(port, case.publisher) as publisher,
        connected(port, case.control_publisher) as control_publisher,
    ):
        assert subscriber.subscribe(case.subscription).value == 1
        forged, control = unique_payload(), unique_payload()
        forged_arrived = subscriber.expect(forged)
        control_arrived = subscriber.expect(control)

        # The forged message goes first (publish() asserts its PUBACK came back).
        publisher.publish(case.forged_topic, forged)
        control_publisher.publish(case.control_topic, control)

        assert control_arrived.wait(DELIVERY_SECONDS)
        assert not forged_arrived.wait(ABSENCE_SECONDS), "forbidden publish delivered"
