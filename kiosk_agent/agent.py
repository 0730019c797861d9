"""The agent's main loop: capture, estimate, drive the scan, feed the outbox."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import psutil

from kiosk_agent.config import AgentSettings
from kiosk_agent.errors import CameraError
from kiosk_agent.link import MqttLink
from kiosk_agent.outbox import Outbox
from kiosk_agent.scan import ScanController, ScanTiming
from kiosk_agent.sources import (
    FrameSource,
    SourceError,
    SyntheticFaceSource,
    VideoSource,
)
from kiosk_agent.vitals import VitalsEngine
from vitals_contract import (
    CameraState,
    Command,
    CommandAction,
    Heartbeat,
    Leaf,
    systemd,
    utc_now,
)

log = logging.getLogger(__name__)

FRAME_TIMEOUT_SECONDS = 1.0
CAMERA_RETRY_MIN_SECONDS = 1.0
CAMERA_STALL_SECONDS = 5.0  # no frame this long: treat the camera as failed


def open_source(spec: str) -> FrameSource:
    """Open the configured camera; raise :class:`CameraError` when it cannot be."""
    source: FrameSource
    if spec == "synthetic":
        source = SyntheticFaceSource(realtime=True, loop=True)
    else:
        source = VideoSource(spec, realtime_file=True)
    try:
        source.start()
    except SourceError as exc:
        raise CameraError(str(exc)) from exc
    return source


class Agent:
    """One kiosk: camera, vitals engine, scan controller, outbox and MQTT link."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.outbox = Outbox(
            settings.outbox_path,
            max_messages=settings.outbox_max_messages,
            max_age_seconds=settings.outbox_max_age_hours * 3600,
        )
        self.link = MqttLink(settings, self.outbox, self._handle_command)
        self._lock = threading.Lock()  # guards the controller across threads
        self._controller: ScanController | None = None
        self._camera_state = CameraState.MISSING
        self._fps = 0.0
        self._process = psutil.Process()

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; camera faults are retried, never fatal."""
        self.link.start()
        systemd.notify("READY=1")
        log.info("agent %s running", self.settings.kiosk_id)
        retry = CAMERA_RETRY_MIN_SECONDS
        try:
            while not stop.is_set():
                try:
                    source = open_source(self.settings.camera)
                except CameraError as exc:
                    self._camera_state = CameraState.MISSING
                    log.warning(
                        "camera unavailable (%s); retrying in %.0f s", exc, retry
                    )
                    self._idle(stop, retry)
                    retry = min(retry * 2, self.settings.camera_retry_max_seconds)
                    continue
                retry = CAMERA_RETRY_MIN_SECONDS
                try:
                    self._capture(source, stop)
                finally:
                    source.stop()
        finally:
            systemd.notify("STOPPING=1")
            self.link.stop()
            self.outbox.close()
            log.info("agent stopped")

    def _capture(self, source: FrameSource, stop: threading.Event) -> None:
        engine = VitalsEngine(fps=source.fps, method=self.settings.vitals_method)
        s = self.settings
        timing = ScanTiming(
            scan_seconds=s.scan_seconds,
            reading_interval_seconds=s.reading_interval_seconds,
            face_lost_abort_seconds=s.face_lost_abort_seconds,
            auto_scan=s.auto_scan,
            auto_scan_cooldown_seconds=s.auto_scan_cooldown_seconds,
        )
        with self._lock:
            self._controller = ScanController(
                s.kiosk_id, engine, timing, self._add_event, self._add_readings
            )
        self._camera_state = CameraState.OK
        frames = 0
        window_start = last_beat = last_frame = time.monotonic()
        while not stop.is_set():
            frame = source.read(FRAME_TIMEOUT_SECONDS)
            now = time.monotonic()
            if frame is None:
                if now - last_frame > CAMERA_STALL_SECONDS:
                    self._camera_state = CameraState.ERROR
                    log.warning("camera delivered no frame for %.0f s; reopening",
                                now - last_frame)  # fmt: skip
                    return
            else:
                last_frame = now
                engine.push(frame.image, frame.timestamp_s)
                frames += 1
                with self._lock:
                    self._controller.tick(now)
            if now - window_start >= 1.0:
                self._fps = frames / (now - window_start)
                frames, window_start = 0, now
            if now - last_beat >= min(s.heartbeat_seconds, self._watchdog_period()):
                self._heartbeat()
                last_beat = now

    def _idle(self, stop: threading.Event, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            self._heartbeat()
            stop.wait(min(self._watchdog_period(), deadline - time.monotonic(), 5.0))

    def _watchdog_period(self) -> float:
        return systemd.watchdog_interval_seconds() or self.settings.heartbeat_seconds

    def _heartbeat(self) -> None:
        systemd.notify("WATCHDOG=1")
        beat = Heartbeat(
            kiosk_id=self.settings.kiosk_id,
            at=utc_now(),
            camera=self._camera_state,
            fps=round(self._fps, 1),
            queue_depth=self.outbox.depth(),
            cpu_percent=self._process.cpu_percent(),
        )
        self.link.publish_now(Leaf.HEARTBEAT, beat)

    # -- sinks and commands -------------------------------------------------------

    def _add_event(self, event: dict[str, object]) -> None:
        self.outbox.add_event(event)
        self.link.wake()

    def _add_readings(self, readings: list[dict[str, object]]) -> None:
        self.outbox.add_readings(readings)
        self.link.wake()

    def _handle_command(self, command: Command) -> str | None:
        """Apply a command; return an error text, or None on success."""
        log.info("command %s (%s)", command.action.value, command.command_id)
        with self._lock:
            controller = self._controller
            if command.action is CommandAction.PING:
                return None
            if controller is None:
                return "camera not ready"
            if command.action is CommandAction.START_SCAN:
                return controller.request_scan(command.patient_ref)
            if command.action is CommandAction.CANCEL_SCAN:
                return controller.cancel(time.monotonic())
            if command.action is CommandAction.SET:
                return _apply_settings(controller, command.args)
        return f"unknown action {command.action.value}"


# Settings a `set` command may change at run time, with their types and bounds.
RUNTIME_SETTINGS: dict[str, tuple[type, float, float]] = {
    "scan_seconds": (float, 5, 600),
    "reading_interval_seconds": (float, 0.2, 60),
    "face_lost_abort_seconds": (float, 0.5, 60),
    "auto_scan_cooldown_seconds": (float, 0, 3600),
    "auto_scan": (bool, 0, 1),
}


def _apply_settings(
    controller: ScanController, args: Mapping[str, object]
) -> str | None:
    """Validate every requested change first, then apply them all; or none."""
    if not args:
        return "set needs at least one setting"
    changes: dict[str, float | bool] = {}
    for name, value in args.items():
        spec = RUNTIME_SETTINGS.get(name)
        if spec is None:
            return f"setting {name!r} cannot be changed at run time"
        kind, low, high = spec
        if kind is bool:
            if not isinstance(value, bool):
                return f"{name} must be true or false"
            changes[name] = value
        elif isinstance(value, bool) or not isinstance(value, int | float):
            return f"{name} must be a number"
        elif not low <= value <= high:
            return f"{name} must be within [{low:g}, {high:g}]"
        else:
            changes[name] = float(value)
    controller.update_timing(**changes)
    log.info("runtime settings changed: %s", ", ".join(sorted(changes)))
    return None
