"""``vitals-bridge``: the bridge with its API, migrations, the embedded broker, the demo."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
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
GRACEFUL_SHUTDOWN_SECONDS = 5
# Ingest commits from a worker thread that needs the GIL back after each database
# round trip; at the default 5 ms switch interval every one of those can wait a
# whole interval behind the busy event loop. bench/ingest.py at 7,000 msg/s
# offered: 5,485-5,559 msg/s committed at 5 ms, 5,708-5,845 at 0.5 ms.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005
# Ingest allocates several container objects per reading and keeps a few batches
# alive, so the default gen-0 threshold (700) promoted them quickly and full
# collections ran every ~0.7 s, scanning the whole heap (imports, FastAPI, FHIR
# models) for 70-250 ms with the GIL held and finding nothing: 4.2 s of 20 s at
# 5,000 msg/s (gc.callbacks, bench/ingest.py). Freezing what start-up built and
# collecting gen 0 every 50,000 allocations cut that to 0.2 s.
GC_THRESHOLDS = (50_000, 20, 10)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # amqtt logs every packet at info level.
    logging.getLogger("amqtt").setLevel(
        max(logging.WARNING, logging.getLevelName(level.upper()))
    )


def tune_runtime() -> None:
    """Set the interpreter up for ingest: GIL hand-offs and garbage collection.

    Call once start-up has built what lives as long as the process.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    gc.freeze()  # start-up's objects: never scan them again
    gc.set_threshold(*GC_THRESHOLDS)


@app.command()
def run(config: ConfigOption = None, log_level: LogLevel = "info") -> None:
    """Run the bridge and the API until SIGTERM or Ctrl-C."""
    _logging(log_level)
    settings = BridgeSettings.load(config)
    from api.app import create_app

    web_app = create_app(settings)
    tune_runtime()
    server = uvicorn.Server(
        uvicorn.Config(
            web_app,
            host=settings.http.host,
            port=settings.http.port,
            log_level=log_level.lower(),
            ws_max_size=64 * 1024,
            # Long-lived streams (SSE) must not hold a shutdown forever.
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            ssl_certfile=settings.http.tls_cert_file,
            ssl_keyfile=settings.http.tls_key_file,
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


kiosk_app = typer.Typer(no_args_is_help=True, help="Provision or revoke kiosks.")
app.add_typer(kiosk_app, name="kiosk")
PathOption = Annotated[Path | None, typer.Option()]


@kiosk_app.command("add")
def kiosk_add(
    kiosk_id: Annotated[str, typer.Argument(help="The new kiosk's id.")],
    broker_host: Annotated[str, typer.Option(help="Broker address kiosks use.")],
    broker_port: Annotated[
        int, typer.Option(help="Broker port (8883 with TLS).")
    ] = 8883,
    out_dir: Annotated[
        Path, typer.Option(help="Where to write agent config/certs.")
    ] = Path("kiosks"),
    mosquitto_passwd: PathOption = None,
    amqtt_passwd: PathOption = None,
    amqtt_config: PathOption = None,
    ca_cert: PathOption = None,
    ca_key: Annotated[
        Path | None, typer.Option(help="With --ca-cert: also issue a client cert.")
    ] = None,
) -> None:
    """Create a kiosk's broker credentials, ACL entries and agent config."""
    from bridge.provision import ProvisionError, add_kiosk

    try:
        done = add_kiosk(
            kiosk_id,
            broker_host=broker_host,
            broker_port=broker_port,
            out_dir=out_dir,
            mosquitto_passwd=mosquitto_passwd,
            amqtt_passwd=amqtt_passwd,
            amqtt_config=amqtt_config,
            ca_cert=ca_cert,
            ca_key=ca_key,
        )
    except ProvisionError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"agent config: {done.agent_config} (holds the password; mode 0600)")
    if done.client_cert is not None:
        typer.echo(f"client certificate: {done.client_cert}")
    typer.echo("Reload the broker so it reads the new credentials.")


@kiosk_app.command("revoke")
def kiosk_revoke(
    kiosk_id: Annotated[str, typer.Argument(help="The kiosk to shut out.")],
    mosquitto_passwd: PathOption = None,
    amqtt_passwd: PathOption = None,
    amqtt_config: PathOption = None,
) -> None:
    """Remove a kiosk's broker credentials and ACL entries."""
    from bridge.provision import revoke_kiosk

    known = revoke_kiosk(
        kiosk_id,
        mosquitto_passwd=mosquitto_passwd,
        amqtt_passwd=amqtt_passwd,
        amqtt_config=amqtt_config,
    )
    typer.echo(f"{kiosk_id}: {'revoked' if known else 'not found'}; reload the broker.")


@app.command("dev-certs")
def dev_certs(
    directory: Annotated[Path, typer.Argument(help="Output directory.")],
    host: Annotated[
        list[str], typer.Option(help="Server name or IP; repeat for several.")
    ] = ["localhost", "127.0.0.1"],  # noqa: B006 (typer reads the default)
) -> None:
    """Create a development CA and a server certificate (not for production)."""
    from bridge.devcerts import issue_server_cert, make_ca

    ca_cert, ca_key = make_ca(directory)
    cert, key = issue_server_cert(host, ca_cert, ca_key, directory)
    typer.echo(f"CA: {ca_cert} (key {ca_key})\nserver: {cert} (key {key})")


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
