"""The live page in a real browser against the real bridge, broker and database.

Each test publishes contract messages as a kiosk would and watches the page react.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support import BrokerEndpoint, ServerThread, bridge_settings, wait_for

from vitals_contract import (
    METRICS,
    Heartbeat,
    KioskStatus,
    Leaf,
    Metric,
    Reading,
    ReadingsMessage,
    ScanEvent,
    kiosk_topic,
)

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
UPDATE_SCREENSHOT = "VITALS_UPDATE_SCREENSHOT"  # set to 1 to rewrite SCREENSHOT
LIVE_TIMEOUT_MS = 15_000  # reconnect backoff is capped at 10 s
SHOW_TIMEOUT_MS = 2_000  # a reading must be on screen this soon after it is published


class Kiosk:
    """A paho client publishing what a kiosk publishes, with scripted values."""

    def __init__(self, broker: BrokerEndpoint, kiosk_id: str) -> None:
        self.broker = broker
        self.kiosk_id = kiosk_id
        self.seq = 0
        self.scan_id = uuid.uuid4().hex[:12]
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}"
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _publish(self, leaf: Leaf, payload: bytes, retain: bool = False) -> None:
        topic = kiosk_topic(self.kiosk_id, leaf, self.broker.root)
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def status(self, state: str) -> None:
        """Publish the retained status, as the agent (or its Last Will) does."""
        message = KioskStatus(
            kiosk_id=self.kiosk_id,
            state=state,
            at=datetime.now(UTC),
            agent_version="0.1.0",
        )
        self._publish(Leaf.STATUS, message.to_bytes(), retain=True)

    def scan(self, state: str) -> None:
        """Publish a scan state change of the current scan."""
        event = ScanEvent(
            kiosk_id=self.kiosk_id,
            seq=self._next_seq(),
            scan_id=self.scan_id,
            state=state,
            at=datetime.now(UTC),
        )
        self._publish(Leaf.EVENTS, event.to_bytes())

    def heartbeat(self) -> None:
        """Publish a healthy heartbeat."""
        beat = Heartbeat(
            kiosk_id=self.kiosk_id,
            at=datetime.now(UTC),
            camera="ok",
            fps=30,
            queue_depth=0,
            cpu_percent=23,
        )
        self._publish(Leaf.HEARTBEAT, beat.to_bytes())

    def readings(
        self,
        metric: Metric,
        values: list[float],
        quality: float = 0.9,
        spacing_seconds: float = 1.0,
        first_at: datetime | None = None,
    ) -> None:
        """Publish one message of ``values`` measured ``spacing_seconds`` apart,
        from ``first_at`` on, or else ending now."""
        now = datetime.now(UTC)
        span = timedelta(seconds=spacing_seconds * (len(values) - 1))
        start = first_at or now - span
        items = [
            Reading(
                seq=self._next_seq(),
                scan_id=self.scan_id,
                metric=metric,
                value=value,
                unit=METRICS[metric].unit,
                quality=quality,
                measured_at=start + timedelta(seconds=spacing_seconds * i),
            )
            for i, value in enumerate(values)
        ]
        message = ReadingsMessage(kiosk_id=self.kiosk_id, sent_at=now, readings=items)
        self._publish(Leaf.READINGS, message.to_bytes())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Stack:
    """Broker, bridge and API for one test, plus the kiosks it scripts."""

    def __init__(self, broker: BrokerEndpoint, database_url: str) -> None:
        self.broker = broker
        self.database_url = database_url
        self.server: ServerThread | None = None
        self.kiosks: list[Kiosk] = []

    def start(self, port: int | None = None, **extra: Any) -> ServerThread:
        """Start the bridge and API (on ``port`` to replace a stopped one)."""
        settings = bridge_settings(self.broker, self.database_url, **extra)
        self.server = ServerThread(settings, port=port)
        self.server.start()
        base = self.server.base
        assert wait_for(lambda: httpx.get(f"{base}/ready").status_code == 200)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def kiosk(self, kiosk_id: str) -> Kiosk:
        kiosk = Kiosk(self.broker, kiosk_id)
        self.kiosks.append(kiosk)
        return kiosk

    def alerts(self) -> list[dict[str, Any]]:
        assert self.server is not None
        with self.server.http() as http:
            response = http.get("/api/v1/alerts", params={"open": True})
        response.raise_for_status()
        alerts: list[dict[str, Any]] = response.json()
        return alerts

    def close(self) -> None:
        for k in self.kiosks:
            k.close()
        self.stop()


@pytest.fixture
def stack(amqtt_broker: BrokerEndpoint, sqlite_url: str) -> Iterator[Stack]:
    s = Stack(amqtt_broker, sqlite_url)
    try:
        yield s
    finally:
        s.close()


def sign_in_before_load(page: Any, server: ServerThread) -> None:
    """Put a token where the page's sign-in control would have stored it."""
    token = json.dumps(server.token(("vitals.read", "vitals.alerts.ack")))
    page.add_init_script(f"sessionStorage.setItem('vitals.token', {token});")


def open_live(page: Any, server: ServerThread) -> None:
    """Sign in, load the page and wait until its live feed is subscribed."""
    sign_in_before_load(page, server)
    page.goto(server.base)
    page.wait_for_selector('#conn[data-state="live"]', timeout=LIVE_TIMEOUT_MS)


def value_cell(kiosk_id: str, metric: str, text: str) -> str:
    """Select the tile value of ``metric`` on ``kiosk_id`` when it reads ``text``."""
    return (
        f'[data-kiosk="{kiosk_id}"] .metric[data-metric="{metric}"] '
        f'.value:text-is("{text}")'
    )


def test_published_reading_appears_within_two_seconds(stack: Stack, page: Any) -> None:
    server = stack.start()
    open_live(page, server)
    kiosk = stack.kiosk("lobby-1")

    kiosk.readings(Metric.HEART_RATE, [72])
    page.wait_for_selector(value_cell("lobby-1", "heart_rate", "72"), timeout=2000)

    kiosk.readings(Metric.SPO2, [97], quality=0.42)
    spo2 = '[data-kiosk="lobby-1"] .metric[data-metric="spo2"]'
    page.wait_for_selector(value_cell("lobby-1", "spo2", "97"), timeout=2000)
    assert page.is_visible(f"{spo2} .est")  # an estimate says so
    assert page.inner_text(f"{spo2} .quality") == "q 0.42"
    assert "low-quality" in page.get_attribute(spo2, "class")
    heart = '[data-kiosk="lobby-1"] .metric[data-metric="heart_rate"]'
    assert not page.is_visible(f"{heart} .est")
    assert "low-quality" not in page.get_attribute(heart, "class")


def test_alert_appears_is_acknowledged_and_stays_until_cleared(
    stack: Stack, page: Any, tmp_path: Path
) -> None:
    server = stack.start()
    open_live(page, server)
    assert not page.is_checked("#sound")  # sound is off until someone turns it on
    page.check("#sound")  # beeps through WebAudio; must not throw

    # Three kiosks mid-scan; one patient's pulse stays at 150 for 12 s of
    # measurement time, past the 5 s the default heart-rate rule requires.
    scripts: dict[str, dict[Metric, list[float]]] = {
        "lobby-1": {
            Metric.HEART_RATE: [68, 70, 71, 69, 72, 74, 73, 71, 70, 72, 71, 72],
            Metric.RESPIRATORY_RATE: [14, 15, 15, 16, 15, 14],
            Metric.SPO2: [97, 98, 97, 97],
            Metric.HRV_SDNN: [48, 51, 47, 50],
            Metric.STRESS_INDEX: [110, 118, 121, 115],
        },
        "lobby-2": {
            Metric.HEART_RATE: [150] * 12,
            Metric.RESPIRATORY_RATE: [19, 20, 20, 19, 20, 20],
            Metric.SPO2: [96, 96, 97, 96],
            Metric.HRV_SDNN: [22, 20, 19, 21],
            Metric.STRESS_INDEX: [380, 402, 411, 425],
        },
        "peds-3": {
            Metric.HEART_RATE: [84, 86, 85, 88, 87, 86, 85, 84, 86, 87, 88, 86],
            Metric.RESPIRATORY_RATE: [17, 18, 18, 17, 18, 17],
            Metric.SPO2: [98, 97, 98, 98],
            Metric.HRV_SDNN: [55, 58, 54, 57],
            Metric.STRESS_INDEX: [90, 95, 92, 88],
        },
    }
    for kiosk_id, script in scripts.items():
        kiosk = stack.kiosk(kiosk_id)
        kiosk.status("online")
        kiosk.heartbeat()
        kiosk.scan("scanning")
        for metric, values in script.items():
            quality = 0.45 if kiosk_id == "peds-3" and metric is Metric.SPO2 else 0.9
            kiosk.readings(metric, values, quality=quality)

    banner = '[data-kiosk="lobby-2"] .alert[data-severity="high"]'
    page.wait_for_selector(f"{banner}.flashing", timeout=5000)
    assert "lobby-2" in page.inner_text("#announcer")
    page.uncheck("#sound")  # the screenshot shows the default
    page.wait_for_selector(value_cell("peds-3", "stress_index", "88"))
    page.wait_for_timeout(300)  # let the last sparklines draw
    # The README's picture is refreshed only on request: a test run leaves the
    # checkout as it found it.
    shot = SCREENSHOT if os.environ.get(UPDATE_SCREENSHOT) else tmp_path / "dash.png"
    page.screenshot(
        path=str(shot),
        animations="disabled",
        clip={"x": 0, "y": 0, "width": 1280, "height": 410},
    )
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank

    page.click(f"{banner} button.ack")
    assert wait_for(
        lambda: [a["state"] for a in stack.alerts()] == ["acknowledged"], timeout=5
    )
    # Acknowledged: still shown, no longer flashing, no button left to press.
    page.wait_for_selector(f'{banner}[data-state="acknowledged"]:not(.flashing)')
    assert page.locator(f"{banner} button.ack").count() == 0
    assert page.is_visible(banner)

    # Back in range long enough (measured after the episode): the alert clears
    # and leaves the page.
    stack.kiosks[1].readings(
        Metric.HEART_RATE, [72] * 8, first_at=datetime.now(UTC) + timedelta(seconds=1)
    )
    page.wait_for_selector(banner, state="detached", timeout=5000)


def test_silent_kiosk_is_marked_stale_and_a_lost_one_offline(
    stack: Stack, page: Any
) -> None:
    server = stack.start(dashboard={"stale_seconds": 2})
    open_live(page, server)
    quiet, lost = stack.kiosk("quiet-1"), stack.kiosk("lost-2")
    for k in (quiet, lost):
        k.status("online")
        k.readings(Metric.HEART_RATE, [64])

    tile = '[data-kiosk="quiet-1"]'
    page.wait_for_selector(value_cell("quiet-1", "heart_rate", "64"), timeout=2000)
    assert not page.is_visible(f"{tile} .badge.stale")
    assert page.inner_text(f"{tile} .badge.state") == "ONLINE"

    # No reading for stale_seconds: the value is greyed and badged "stale".
    page.wait_for_selector(f"{tile}.stale .badge.stale", timeout=4000)
    fresh = page.get_attribute(
        f'{tile} .metric[data-metric="heart_rate"]', "data-fresh"
    )
    assert fresh == "stale"

    # What the MQTT Last Will of a vanished kiosk publishes.
    lost.status("offline")
    page.wait_for_selector('[data-kiosk="lost-2"].offline', timeout=2000)
    assert page.inner_text('[data-kiosk="lost-2"] .badge.state') == "OFFLINE"


def test_page_recovers_by_itself_after_the_bridge_restarts(
    stack: Stack, page: Any
) -> None:
    server = stack.start()
    open_live(page, server)
    kiosk = stack.kiosk("lobby-1")
    kiosk.readings(Metric.HEART_RATE, [70])
    page.wait_for_selector(value_cell("lobby-1", "heart_rate", "70"), timeout=2000)

    port = server.port
    stack.stop()
    page.wait_for_selector('#conn[data-state="down"]', timeout=5000)
    server = stack.start(port=port)
    page.wait_for_selector('#conn[data-state="live"]', timeout=LIVE_TIMEOUT_MS)

    kiosk.readings(Metric.HEART_RATE, [91])
    page.wait_for_selector(value_cell("lobby-1", "heart_rate", "91"), timeout=2000)
    assert page.inner_text("#conn") == "Live (WebSocket)"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1


def test_server_sent_events_carry_the_feed_when_websockets_are_unavailable(
    stack: Stack, page: Any
) -> None:
    server = stack.start()
    page.add_init_script("delete window.WebSocket; window.WebSocket = undefined;")
    open_live(page, server)
    assert page.inner_text("#conn") == "Live (SSE)"
    kiosk = stack.kiosk("lobby-1")

    kiosk.status("online")
    kiosk.readings(Metric.RESPIRATORY_RATE, [16])
    page.wait_for_selector(
        value_cell("lobby-1", "respiratory_rate", "16"), timeout=2000
    )
    page.wait_for_selector('[data-kiosk="lobby-1"] .badge.state[data-state="online"]')


def test_detail_view_charts_the_latest_scan(stack: Stack, page: Any) -> None:
    server = stack.start()
    kiosk = stack.kiosk("lobby-1")
    kiosk.readings(Metric.HEART_RATE, [70, 71, 73])  # an earlier patient
    kiosk.scan_id = "scan-latest"
    kiosk.scan("scanning")
    kiosk.readings(Metric.HEART_RATE, [80, 82, 81, 83, 84])
    kiosk.readings(Metric.SPO2, [97, 96])
    open_live(page, server)
    page.wait_for_selector(value_cell("lobby-1", "heart_rate", "84"))

    page.click('[data-kiosk="lobby-1"] h2 button')
    caption = '#detail figure[data-metric="heart_rate"] figcaption'
    page.wait_for_selector(f"{caption}:has-text('5 readings')")
    assert "last 84 /min, range 80–84" in page.inner_text(caption)
    assert "scan-latest" in page.inner_text("#detail-info")
    assert "(estimate)" in page.inner_text('#detail figure[data-metric="spo2"]')

    kiosk.readings(Metric.HEART_RATE, [85])  # live while the view is open
    page.wait_for_selector(f"{caption}:has-text('6 readings')", timeout=2000)
    page.click("#detail button.close")

    # The next patient steps up: the last values are marked as the previous scan's,
    # and until the new scan measures, the view shows the previous one, saying so.
    kiosk.scan_id = "scan-next"
    kiosk.scan("face_present")
    heart = '[data-kiosk="lobby-1"] .metric[data-metric="heart_rate"]'
    page.wait_for_selector(f"{heart}.earlier-scan .prev", timeout=2000)
    page.click('[data-kiosk="lobby-1"] h2 button')
    page.wait_for_selector(f"{caption}:has-text('6 readings')")
    assert "previous scan scan-latest" in page.inner_text("#detail-info")
    kiosk.readings(Metric.HEART_RATE, [77])
    page.wait_for_selector(f"{caption}:has-text('1 reading,')", timeout=2000)
    assert "Latest scan scan-next" in page.inner_text("#detail-info")


def test_page_asks_for_a_token_and_uses_it(stack: Stack, page: Any) -> None:
    server = stack.start()
    kiosk = stack.kiosk("lobby-1")
    kiosk.readings(Metric.HEART_RATE, [66])
    headers: list[str | None] = []
    page.on(
        "request",
        lambda r: (
            headers.append(r.headers.get("authorization"))
            if "/api/v1/" in r.url
            else None
        ),
    )
    page.goto(server.base)

    # No token: the socket is closed with 4401 and the page asks for one.
    page.wait_for_selector("#signin-dialog[open]")
    assert page.get_attribute("#conn", "data-state") == "signin"
    token = server.token(("vitals.read",))
    page.fill("#token", token)
    page.click("#signin-dialog button[type=submit]")

    # The socket takes the token as a subprotocol, REST as a bearer header.
    page.wait_for_selector('#conn[data-state="live"]')
    assert page.inner_text("#conn") == "Live (WebSocket)"
    page.wait_for_selector(value_cell("lobby-1", "heart_rate", "66"))
    assert f"Bearer {token}" in headers
    assert page.evaluate("sessionStorage.getItem('vitals.token')") == token
    assert page.is_visible("#signout")


def test_revoked_or_expired_token_sends_the_page_back_to_sign_in(
    stack: Stack, page: Any
) -> None:
    server = stack.start()

    def refuse(ws: Any) -> None:
        ws.on_message(lambda _frame: ws.close(code=4401, reason="token expired"))

    page.route_web_socket("**/ws", refuse)
    open_page = page.goto(server.base)
    assert open_page is not None
    sign_in_before_load(page, server)
    page.reload()
    page.wait_for_selector("#signin-dialog[open]")
    assert "expired" in page.inner_text("#signin-reason")
    assert page.is_visible("#signin")


def test_token_in_the_address_fragment_signs_in(stack: Stack, page: Any) -> None:
    server = stack.start()
    token = server.token(("vitals.read",))
    page.goto(f"{server.base}/#token={token}")  # what `make demo` prints
    page.wait_for_selector('#conn[data-state="live"]')
    assert page.evaluate("sessionStorage.getItem('vitals.token')") == token
    assert "#" not in page.url  # no token left in the address bar or history
