"""The scan lifecycle: idle, face present, scanning, then complete or aborted.

The controller is driven by the capture loop after every frame and by commands. It
emits scan events and readings through two callbacks (the outbox in production), so
it holds no I/O of its own and can be tested with a fake clock.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from vitals_contract import METRICS, Metric, Reading, ScanState

log = logging.getLogger(__name__)

READING_DECIMALS = 2


class Estimate(Protocol):
    """One metric of a vitals snapshot (see ``kiosk_agent.vitals``)."""

    @property
    def value(self) -> float | None: ...
    @property
    def quality(self) -> float: ...
    @property
    def reason(self) -> str | None: ...


class Snapshot(Protocol):
    """A vitals snapshot (see ``kiosk_agent.vitals``)."""

    @property
    def estimates(self) -> Mapping[str, Estimate]: ...
    @property
    def reason(self) -> str | None: ...


class Engine(Protocol):
    """The part of the vitals engine the controller uses."""

    @property
    def face_present(self) -> bool: ...
    def snapshot(self) -> Snapshot: ...
    def summary(self) -> Snapshot: ...
    def reset(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ScanTiming:
    """Durations that shape a scan, in seconds."""

    scan_seconds: float = 30.0
    reading_interval_seconds: float = 1.0
    face_lost_abort_seconds: float = 3.0
    auto_scan: bool = True
    auto_scan_cooldown_seconds: float = 5.0


EventSink = Callable[[dict[str, Any]], None]
ReadingsSink = Callable[[list[dict[str, Any]]], None]


class ScanController:
    """Turns face presence and vitals snapshots into scan events and readings."""

    def __init__(
        self,
        kiosk_id: str,
        engine: Engine,
        timing: ScanTiming,
        on_event: EventSink,
        on_readings: ReadingsSink,
    ) -> None:
        self._kiosk = kiosk_id
        self._engine = engine
        self._timing = timing
        self._on_event = on_event
        self._on_readings = on_readings
        self.state = ScanState.IDLE
        self.scan_id: str | None = None
        self._patient_ref: str | None = None
        self._requested = False
        self._started = 0.0
        self._last_reading = 0.0
        self._face_last_seen = 0.0
        self._idle_since = -1e9

    # -- commands -----------------------------------------------------------------

    def update_timing(self, **changes: float | bool) -> None:
        """Change scan timings at run time (unknown names raise TypeError)."""
        self._timing = dataclasses.replace(self._timing, **changes)  # type: ignore[arg-type]

    def request_scan(self, patient_ref: str | None) -> str | None:
        """Arm a scan for the next face, bound to ``patient_ref``; return an error."""
        if self.state is ScanState.SCANNING:
            return "a scan is already running"
        self._requested = True
        self._patient_ref = patient_ref
        return None

    def cancel(self, now: float) -> str | None:
        """Abort the running scan; return an error when there is none."""
        self._requested = False
        if self.state is not ScanState.SCANNING:
            return "no scan is running"
        self._finish(now, ScanState.ABORTED, "cancelled by command")
        return None

    # -- per frame ------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Advance the state machine; ``now`` is a monotonic time in seconds."""
        face = self._engine.face_present
        if face:
            self._face_last_seen = now
        if self.state is ScanState.SCANNING:
            self._tick_scanning(now, face)
        elif face:
            cooled = now - self._idle_since >= self._timing.auto_scan_cooldown_seconds
            wanted = self._requested or not self._timing.auto_scan or cooled
            if self.state is ScanState.IDLE and wanted:
                self.scan_id = uuid.uuid4().hex[:16]
                self.state = ScanState.FACE_PRESENT
                self._emit_state(ScanState.FACE_PRESENT, None)
            if self.state is ScanState.FACE_PRESENT and (
                self._requested or (self._timing.auto_scan and cooled)
            ):
                self._start(now)
        elif self.state is ScanState.FACE_PRESENT:
            self._emit_state(ScanState.IDLE, "face left before the scan started")
            self.state = ScanState.IDLE
            self.scan_id = None

    def _start(self, now: float) -> None:
        self._engine.reset()
        self.state = ScanState.SCANNING
        self._requested = False
        self._started = self._last_reading = now
        self._emit_state(ScanState.SCANNING, None)
        log.info("scan %s started", self.scan_id)

    def _tick_scanning(self, now: float, face: bool) -> None:
        if (
            not face
            and now - self._face_last_seen > self._timing.face_lost_abort_seconds
        ):
            self._finish(now, ScanState.ABORTED, "face lost")
            return
        if now - self._started >= self._timing.scan_seconds:
            summary = self._engine.summary()
            self._emit_readings(summary, final=True)
            self._finish(now, ScanState.COMPLETE, summary.reason)
            return
        if now - self._last_reading >= self._timing.reading_interval_seconds:
            self._last_reading = now
            self._emit_readings(self._engine.snapshot(), final=False)

    def _finish(self, now: float, state: ScanState, reason: str | None) -> None:
        self._emit_state(state, reason)
        log.info(
            "scan %s %s%s", self.scan_id, state.value, f" ({reason})" if reason else ""
        )
        self.state = ScanState.IDLE
        self.scan_id = None
        self._patient_ref = None
        self._idle_since = now

    # -- output ---------------------------------------------------------------------

    def _emit_state(self, state: ScanState, reason: str | None) -> None:
        assert self.scan_id is not None
        event: dict[str, Any] = {
            "kiosk_id": self._kiosk,
            "scan_id": self.scan_id,
            "state": state.value,
            "at": _iso_now(),
        }
        if reason:
            event["reason"] = reason[:200]
        if self._patient_ref is not None:
            event["patient_ref"] = self._patient_ref
        self._on_event(event)

    def _emit_readings(self, snapshot: Snapshot, *, final: bool) -> None:
        measured_at = _iso_now()
        readings: list[dict[str, Any]] = []
        for name, est in snapshot.estimates.items():
            if est.value is None:
                continue  # refused: no number, the reason stays local
            try:
                metric = Metric(name)
                reading = Reading(
                    seq=0,
                    scan_id=self.scan_id,
                    metric=metric,
                    value=round(est.value, READING_DECIMALS),
                    unit=METRICS[metric].unit,
                    quality=round(min(max(est.quality, 0.0), 1.0), 3),
                    measured_at=datetime.fromisoformat(measured_at),
                    final=final,
                )
            except (ValueError, ValidationError) as exc:
                log.warning("dropped an implausible %s estimate: %s", name, exc)
                continue
            readings.append(reading.model_dump(mode="json", exclude={"seq"}))
        if readings:
            self._on_readings(readings)


def _iso_now() -> str:
    return datetime.now(UTC).isoformat()
