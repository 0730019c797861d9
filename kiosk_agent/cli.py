"""``kiosk-agent``: run the kiosk service, or analyse a video file."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from kiosk_agent.config import AgentSettings

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML config file; KIOSK_* environment variables override it."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the kiosk agent until SIGTERM or Ctrl-C."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = AgentSettings.load(config)
    from kiosk_agent.agent import Agent  # heavy imports only for this command

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Agent(settings).run(stop)


@app.command("config-example")
def config_example() -> None:
    """Print every agent option with its default, as a commented TOML file."""
    from vitals_contract.settings import render_example

    typer.echo(render_example(AgentSettings, "KIOSK_"), nl=False)


@app.command()
def simulate(
    config: Annotated[Path | None, typer.Option(help="TOML config file.")] = None,
    messages: Annotated[int, typer.Option(help="Messages of 5 readings to send.")] = 60,
    rate: Annotated[float, typer.Option(help="Messages per second.")] = 1.0,
    kiosks: Annotated[
        int, typer.Option(help="Simulate this many kiosks, ids <kiosk_id>-<n>.")
    ] = 1,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Send synthetic readings through the real outbox and link (no camera)."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from kiosk_agent.simulate import SimulatedKiosk, run_fleet

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings = AgentSettings.load(config)
    if kiosks == 1:
        SimulatedKiosk(settings).run(messages, rate, stop)
    else:
        run_fleet(settings, kiosks, messages, rate, stop)


@app.command()
def analyze(
    video: Annotated[str, typer.Argument(help="Video file to analyse.")],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object.")
    ] = False,
) -> None:
    """Estimate vital signs from a face video."""
    from kiosk_agent.analyze import run_analyze

    raise typer.Exit(run_analyze(video, json_output))


if __name__ == "__main__":
    app()
