"""A database outage is a clear 503 in the one error shape, and ends by itself."""

from __future__ import annotations

from support import (
    POSTGRES_ADMIN_URL,
    ServerThread,
    bridge_settings,
    embedded_amqtt,
    fresh_postgres,
    wait_for,
)


def _set_connections(database: str, allowed: bool) -> None:
    import psycopg  # present: fresh_postgres skipped the test otherwise

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}'
        )
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s",
                (database,),
            )


def test_rest_answers_503_while_the_database_is_gone() -> None:
    with embedded_amqtt() as broker, fresh_postgres("vitals_outage") as url:
        database = url.rsplit("/", 1)[1]
        server = ServerThread(bridge_settings(broker, url))
        server.start()
        try:
            client = server.http()
            paths = ("/api/v1/kiosks", "/api/v1/readings", "/api/v1/scans")
            for path in paths:
                assert client.get(path).status_code == 200
            _set_connections(database, allowed=False)
            try:
                for path in paths:
                    response = client.get(path)
                    assert response.status_code == 503, path
                    error = response.json()["error"]
                    assert error["code"] == "unavailable"
                    assert error["message"] == "database unavailable"
            finally:
                _set_connections(database, allowed=True)
            assert wait_for(
                lambda: all(client.get(p).status_code == 200 for p in paths), 10
            )
        finally:
            server.stop()
