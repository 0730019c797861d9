"""The scan state machine, driven by a scripted engine and a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiosk_agent.scan import ScanController, ScanTiming
from vitals_contract import Reading


@dataclass
class Est:
    value: float | None
    quality: float
    reason: str | None = None


@dataclass
class Snap:
    estimates: dict[str, Any]
    reason: str | None = None


@dataclass
class ScriptedEngine:
    """Stands in for the camera: the test decides face presence and estimates."""

    face_present: bool = False
    resets: int = 0
    estimates: dict[str, Any] = field(
        default_factory=lambda: {
            "heart_rate": Est(72.04, 0.91),
            "respiratory_rate": Est(None, 0.1, "weak respiratory modulation"),
            "spo2": Est(97.0, 0.5),
        }
    )

    def snapshot(self) -> Snap:
        return Snap(self.estimates)

    def summary(self) -> Snap:
        return Snap(self.estimates)

    def reset(self) -> None:
        self.resets += 1


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.readings: list[list[dict[str, Any]]] = []


def make(timing: ScanTiming) -> tuple[ScanController, ScriptedEngine, Recorder]:
    engine, rec = ScriptedEngine(), Recorder()
    ctl = ScanController("k1", engine, timing, rec.events.append, rec.readings.append)
    return ctl, engine, rec


def run(ctl: ScanController, start: float, stop: float, step: float = 0.1) -> float:
    t = start
    while t < stop - 1e-9:
        t = round(t + step, 6)
        ctl.tick(t)
    return t


def test_complete_scan_emits_states_partials_and_summary() -> None:
    ctl, engine, rec = make(ScanTiming(scan_seconds=5, auto_scan_cooldown_seconds=9))
    engine.face_present = True
    run(ctl, 0, 7)
    states = [e["state"] for e in rec.events]
    assert states == ["face_present", "scanning", "complete"]
    assert len({e["scan_id"] for e in rec.events}) == 1
    partials = [batch for batch in rec.readings if not batch[0]["final"]]
    finals = [batch for batch in rec.readings if batch[0]["final"]]
    assert 4 <= len(partials) <= 5
    assert len(finals) == 1
    # A refused metric yields no number; the others carry their quality.
    assert {r["metric"] for r in finals[0]} == {"heart_rate", "spo2"}
    assert finals[0][0]["value"] == 72.04
    for r in finals[0]:
        Reading.model_validate({**r, "seq": 0})


def test_face_lost_aborts_the_scan() -> None:
    ctl, engine, rec = make(ScanTiming(scan_seconds=30, face_lost_abort_seconds=2))
    engine.face_present = True
    t = run(ctl, 0, 3)
    engine.face_present = False
    run(ctl, t, t + 3)
    assert rec.events[-1]["state"] == "aborted"
    assert rec.events[-1]["reason"] == "face lost"
    assert not any(batch[0]["final"] for batch in rec.readings)


def test_command_binds_the_patient_and_cancel_aborts() -> None:
    ctl, engine, rec = make(ScanTiming(auto_scan=False))
    engine.face_present = True
    run(ctl, 0, 1)
    assert [e["state"] for e in rec.events] == ["face_present"]
    assert ctl.request_scan("patient-7") is None
    t = run(ctl, 1, 2)
    assert ctl.request_scan("other") == "a scan is already running"
    assert ctl.cancel(t) is None
    assert ctl.cancel(t) == "no scan is running"
    assert [e["state"] for e in rec.events] == ["face_present", "scanning", "aborted"]
    assert rec.events[1]["patient_ref"] == "patient-7"
    assert "patient_ref" not in rec.events[0]


def test_implausible_estimates_are_dropped_not_published() -> None:
    ctl, engine, rec = make(ScanTiming(scan_seconds=5, auto_scan_cooldown_seconds=0))
    engine.estimates = {"heart_rate": Est(900.0, 0.9), "spo2": Est(96.0, 0.7)}
    engine.face_present = True
    run(ctl, 0, 2)
    assert rec.readings
    assert all(r["metric"] == "spo2" for batch in rec.readings for r in batch)


def test_auto_scan_waits_for_the_cooldown() -> None:
    ctl, engine, rec = make(ScanTiming(scan_seconds=5, auto_scan_cooldown_seconds=4))
    engine.face_present = True
    run(ctl, 0, 8)
    assert [e["state"] for e in rec.events].count("scanning") == 1
    run(ctl, 8, 10)
    assert [e["state"] for e in rec.events].count("scanning") == 2
