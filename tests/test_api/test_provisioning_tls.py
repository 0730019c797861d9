"""Provisioning and TLS against a real Mosquitto: allowed and denied cases."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from pydantic import SecretStr
from support import ServerThread, bridge_settings, tcp_reachable, wait_for

from bridge.devcerts import issue_server_cert, make_ca
from bridge.mqtt import V5, Delivery, MqttClient, Subscription
from bridge.provision import add_kiosk, mosquitto_hash, revoke_kiosk
from kiosk_agent.config import AgentSettings
from vitals_contract.mqtt import JitteredBackoff, build_client
from vitals_contract.settings import MqttSettings

REPO = Path(__file__).resolve().parents[2]
ROOT = "vitals/v1"  # the ACL file is written for the production root


class PrivateMosquitto:
    """Mosquitto with TLS, a password file and the repo's ACL, on free ports."""

    def __init__(self, workdir: Path) -> None:
        from bridge.broker import free_port

        self.workdir = workdir
        self.tls_port = free_port()
        self.passwd = workdir / "passwd"
        self.passwd.write_text("")
        self.passwd.chmod(0o600)
        self.ca, self.ca_key = make_ca(workdir / "ca")
        self.cert, self.key = issue_server_cert(
            ["127.0.0.1"], self.ca, self.ca_key, workdir
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"user root\nper_listener_settings false\nallow_anonymous false\n"
            f"password_file {self.passwd}\nacl_file {REPO / 'broker_config' / 'mosquitto.acl'}\n"
            f"listener {self.tls_port} 127.0.0.1\ncertfile {self.cert}\nkeyfile {self.key}\n"
            f"cafile {self.ca}\nrequire_certificate false\n"
        )
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=log, stderr=log
        )
        assert wait_for(lambda: tcp_reachable("127.0.0.1", self.tls_port, 0.2), 10)

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(1)  # SIGHUP re-reads password and ACL files
        threading.Event().wait(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not installed")
    b = PrivateMosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


def connect(settings: AgentSettings, client_id: str) -> tuple[mqtt.Client, str]:
    """Connect with ``settings``; return the client and the outcome."""
    client = build_client(
        settings.mqtt, client_id, protocol=MQTTProtocolVersion.MQTTv311
    )
    outcome: list[str] = []
    done = threading.Event()

    def on_connect(_c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        outcome.append(str(rc))
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(settings.mqtt.host, settings.mqtt.port)
    except (ssl.SSLError, OSError) as exc:
        return client, f"tls: {type(exc).__name__}"
    client.loop_start()
    done.wait(5)
    return client, outcome[0] if outcome else "no answer"


def test_provisioned_kiosk_connects_over_tls_and_revoked_one_cannot(
    broker: PrivateMosquitto, tmp_path: Path
) -> None:
    made = add_kiosk(
        "kiosk-a",
        broker_host="127.0.0.1",
        broker_port=broker.tls_port,
        out_dir=tmp_path / "kiosks",
        mosquitto_passwd=broker.passwd,
        ca_cert=broker.ca,
    )
    assert "kiosk-a:$7$101$" in broker.passwd.read_text()
    assert made.password not in broker.passwd.read_text()
    assert oct(made.agent_config.stat().st_mode & 0o777) == "0o600"
    broker.reload()

    settings = AgentSettings.load(made.agent_config)
    client, outcome = connect(settings, "kiosk-a")
    assert outcome == "Success"
    client.disconnect()
    client.loop_stop()

    wrong = settings.model_copy(
        update={
            "mqtt": settings.mqtt.model_copy(update={"password": SecretStr("guess")})
        }
    )
    _, outcome = connect(wrong, "kiosk-a-2")
    assert outcome != "Success"

    assert revoke_kiosk("kiosk-a", mosquitto_passwd=broker.passwd)
    broker.reload()
    _, outcome = connect(settings, "kiosk-a-3")
    assert outcome != "Success"


def test_untrusted_broker_certificate_is_refused(
    broker: PrivateMosquitto, tmp_path: Path
) -> None:
    made = add_kiosk(
        "kiosk-b",
        broker_host="127.0.0.1",
        broker_port=broker.tls_port,
        out_dir=tmp_path / "kiosks",
        mosquitto_passwd=broker.passwd,
        ca_cert=broker.ca,
    )
    broker.reload()
    other_ca, _ = make_ca(tmp_path / "other-ca", name="someone else's CA")
    settings = AgentSettings.load(made.agent_config)
    untrusting = settings.model_copy(
        update={"mqtt": settings.mqtt.model_copy(update={"tls_ca_file": other_ca})}
    )
    _, outcome = connect(untrusting, "kiosk-b")
    assert outcome.startswith("tls:")
    _, outcome = connect(settings, "kiosk-b")
    assert outcome == "Success"


def test_https_api_with_the_dev_ca(
    amqtt_broker: object, sqlite_url: str, tmp_path: Path
) -> None:
    ca, ca_key = make_ca(tmp_path / "ca")
    cert, key = issue_server_cert(["127.0.0.1"], ca, ca_key, tmp_path)
    settings = bridge_settings(amqtt_broker, sqlite_url)  # type: ignore[arg-type]
    server = ServerThread(settings, ssl=(cert, key))
    server.start()
    try:
        url = f"https://127.0.0.1:{server.port}/health"
        assert (
            httpx.get(
                url, verify=ssl.create_default_context(cafile=str(ca))
            ).status_code
            == 200
        )
        other_ca, _ = make_ca(tmp_path / "other")
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, verify=ssl.create_default_context(cafile=str(other_ca)))
    finally:
        server.stop()


async def test_bridge_client_reads_kiosks_over_tls_with_its_own_credentials(
    broker: PrivateMosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bridge's MQTT client: TLS against the dev CA, the `bridge` user's ACL."""
    made = add_kiosk(
        "kiosk-c",
        broker_host="127.0.0.1",
        broker_port=broker.tls_port,
        out_dir=tmp_path / "kiosks",
        mosquitto_passwd=broker.passwd,
        ca_cert=broker.ca,
    )
    password = secrets.token_urlsafe(16)
    with broker.passwd.open("a") as fh:
        fh.write(f"bridge:{mosquitto_hash(password)}\n")
    broker.reload()
    bridge_mqtt = MqttSettings(
        host="127.0.0.1",
        port=broker.tls_port,
        username="bridge",
        password=SecretStr(password),
        tls_ca_file=broker.ca,
    )

    def bridge_client(
        settings: MqttSettings, got: list[Delivery], states: list[bool]
    ) -> MqttClient:
        return MqttClient(
            settings,
            f"bridge-tls-{secrets.token_hex(3)}",
            version=V5,
            session_expiry=60,
            subscriptions=[Subscription(f"{ROOT}/kiosk/+/readings")],
            on_publishes=got.extend,
            on_state=states.append,
            backoff=JitteredBackoff(0.1, 0.3),
            connect_timeout=5,
        )

    got: list[Delivery] = []
    states: list[bool] = []
    client = bridge_client(bridge_mqtt, got, states)
    client.start()
    try:
        async with asyncio.timeout(10):
            while not client.is_subscribed:  # noqa: ASYNC110 - polls client state
                await asyncio.sleep(0.05)
        kiosk, outcome = await asyncio.to_thread(
            connect, AgentSettings.load(made.agent_config), "kiosk-c"
        )
        assert outcome == "Success"
        info = kiosk.publish(f"{ROOT}/kiosk/kiosk-c/readings", b"{}", qos=1)
        await asyncio.to_thread(info.wait_for_publish, 5)
        kiosk.disconnect()
        kiosk.loop_stop()
        async with asyncio.timeout(10):
            while not got:  # noqa: ASYNC110 - polls what the client handed over
                await asyncio.sleep(0.05)
        assert [(d.topic, d.payload) for d in got] == [
            (f"{ROOT}/kiosk/kiosk-c/readings", b"{}")
        ]
        assert client.ack(got) == 0
    finally:
        await client.stop()
    assert states == [True, False]

    # A wrong password is refused at CONNACK: retried, never reported up.
    refused_states: list[bool] = []
    wrong = bridge_client(
        bridge_mqtt.model_copy(update={"password": SecretStr("guess")}),
        [],
        refused_states,
    )
    wrong.start()
    try:
        async with asyncio.timeout(10):
            while not any("refused" in r.message for r in caplog.records):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert not wrong.is_connected
        assert refused_states == []
    finally:
        await wrong.stop()
