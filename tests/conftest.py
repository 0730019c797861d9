"""Shared fixtures: real brokers, real databases, real servers on free ports.

External services are used when reachable and skipped with a reason otherwise:
Mosquitto on 127.0.0.1:1883 and PostgreSQL on 127.0.0.1:5432 (database ``test``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    BrokerEndpoint,
    EmbeddedBroker,
    ServerThread,
    bridge_settings,
    tcp_reachable,
)

from bridge.broker import free_port

MOSQUITTO = ("127.0.0.1", 1883)
POSTGRES_ADMIN_URL = os.environ.get(
    "VITALS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def amqtt_broker() -> Iterator[BrokerEndpoint]:
    """An embedded amqtt broker on a free port, private to the test."""
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        yield BrokerEndpoint("127.0.0.1", broker.port, "amqtt")
    finally:
        broker.stop()


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
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg not installed")
    name = f"vitals_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432 (database test)")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace(
        "postgresql://", "postgresql+psycopg://"
    )
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
