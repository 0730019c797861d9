"""``vitals-bridge``: the bridge with its API, migrations, the embedded broker, the demo."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from bridge.config import BridgeSettings

app = typer.Typer(no_args_is_help=True, add_completion=False)

ConfigOption = Annotated[
    Path | None,
    typer.Option(help="TOML config file; VITALS_* environment variables override it."),
]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning")]


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # amqtt logs every packet at info level.
    logging.getLogger("amqtt").setLevel(
        max(logging.WARNING, logging.getLevelName(level.upper()))
    )


@app.command()
def run(config: ConfigOption = None, log_level: LogLevel = "info") -> None:
    """Run the bridge and the API until SIGTERM or Ctrl-C."""
    _logging(log_level)
    settings = BridgeSettings.load(config)
    from api.app import create_app

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.http.host,
            port=settings.http.port,
            log_level=log_level.lower(),
            ws_max_size=64 * 1024,
        )
    )
    server.run()


@app.command("config-example")
def config_example() -> None:
    """Print every bridge option with its default, as a commented TOML file."""
    from vitals_contract.settings import render_example

    typer.echo(render_example(BridgeSettings, "VITALS_"), nl=False)


@app.command()
def token(
    subject: Annotated[
        str, typer.Option(help="Who the token is for (logged, audited).")
    ],
    scope: Annotated[
        list[str], typer.Option(help="Scope to grant; repeat for several.")
    ],
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 8 * 3600,
    config: ConfigOption = None,
) -> None:
    """Mint an access token (e.g. for a dashboard sign-in) with the configured key."""
    from api.auth import sign_token

    settings = BridgeSettings.load(config)
    typer.echo(sign_token(settings.auth, subject, scope, ttl))


@app.command("hash-secret")
def hash_secret_command(
    secret: Annotated[str, typer.Option(prompt=True, hide_input=True)],
) -> None:
    """Hash an API client secret for the `auth.clients` settings."""
    from api.auth import hash_secret

    typer.echo(hash_secret(secret))


@app.command()
def migrate(config: ConfigOption = None, log_level: LogLevel = "info") -> None:
    """Apply database migrations and exit."""
    _logging(log_level)
    settings = BridgeSettings.load(config)
    from bridge.store.migrate import upgrade

    upgrade(settings.database_url)


@app.command()
def broker(
    config: Annotated[
        Path | None, typer.Option(help="amqtt YAML config (see broker_config/).")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Listener address (default: the file's).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Listener port (default: the file's).")
    ] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the embedded amqtt broker (MQTT 3.1.1)."""
    _logging(log_level)
    from bridge.broker import DEFAULT_CONFIG, load_config, serve

    broker_config = load_config(config or DEFAULT_CONFIG, host, port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(broker_config, stop)

    asyncio.run(main())


@app.command()
def demo(
    duration: Annotated[
        float, typer.Option(help="Stop after this many seconds (0: run until Ctrl-C).")
    ] = 0,
    workdir: Annotated[
        Path, typer.Option(help="Where the demo keeps its files.")
    ] = Path("var/demo"),
) -> None:
    """Start broker, bridge with API and one synthetic kiosk; print the live page URL."""
    _logging("info")
    from api.demo import run_demo

    raise typer.Exit(run_demo(workdir, duration))


if __name__ == "__main__":
    app()


def demo_main() -> None:
    """Entry point of ``vitals-demo``."""
    typer.run(demo)
