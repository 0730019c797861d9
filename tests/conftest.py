"""Shared fixtures: real brokers, real databases, real servers on free ports.

External services are used when reachable and skipped with a reason otherwise:
Mosquitto on 127.0.0.1:1883 and PostgreSQL on 127.0.0.1:5432 (database ``test``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from support import (
    BrokerEndpoint,
    ServerThread,
    bridge_settings,
    embedded_amqtt,
    fresh_postgres,
    tcp_reachable,
)

MOSQUITTO = ("127.0.0.1", 1883)

# Property tests assert outcomes, not speed: on a loaded 2-core CI machine a single
# example can take longer than Hypothesis's 200 ms default deadline.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")


@pytest.fixture
def amqtt_broker() -> Iterator[BrokerEndpoint]:
    """An embedded amqtt broker on a free port, private to the test."""
    with embedded_amqtt() as broker:
        yield broker


@pytest.fixture
def mosquitto_broker() -> BrokerEndpoint:
    """The machine's Mosquitto, with a topic root private to the test."""
    if not tcp_reachable(*MOSQUITTO):
        pytest.skip("Mosquitto not reachable on 127.0.0.1:1883")
    return BrokerEndpoint(*MOSQUITTO, "mosquitto")


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> BrokerEndpoint:
    """Each real broker in turn."""
    endpoint: BrokerEndpoint = request.getfixturevalue(f"{request.param}_broker")
    return endpoint


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file private to the test."""
    return f"sqlite:///{tmp_path / 'vitals.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    with fresh_postgres("vitals_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each real database in turn."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def bridge_server(broker: BrokerEndpoint, database_url: str) -> Iterator[ServerThread]:
    """The bridge and API on each broker and each database."""
    server = ServerThread(bridge_settings(broker, database_url))
    server.start()
    try:
        yield server
    finally:
        server.stop()
