"""End-to-end tests of VitalsEngine on synthetic faces with a known pulse."""

from __future__ import annotations

import numpy as np
import pytest

from kiosk_agent.vitals import MetricEstimate, VitalsEngine, VitalsSnapshot
from kiosk_agent.vitals.synthetic import SceneConfig, SyntheticScene
from vitals_contract import Metric

pytest.importorskip("skimage")

FPS = 30.0


def run(
    config: SceneConfig,
) -> tuple[VitalsEngine, SyntheticScene]:
    """Push every frame of a scene through a new engine."""
    scene = SyntheticScene(config)
    engine = VitalsEngine(FPS, scan_seconds=config.duration_s)
    for i in range(scene.n_frames):
        engine.push(scene.frame(i), float(scene.times_s[i]))
    return engine, scene


@pytest.fixture(scope="module")
def positive() -> tuple[VitalsEngine, SyntheticScene]:
    # Dev seed, not from the bench set.
    config = SceneConfig(
        duration_s=22.0, heart_rate_bpm=84.0, respiratory_rate_bpm=14.0,
        skin_tone=6, seed=11,
    )  # fmt: skip
    return run(config)


def test_summary_recovers_known_vitals(positive) -> None:
    engine, scene = positive
    s = engine.summary()
    assert isinstance(s, VitalsSnapshot)
    assert s.reason is None
    assert s.face_fraction == 1.0
    assert set(s.estimates) == {m.value for m in Metric}
    hr = s.estimates[Metric.HEART_RATE.value]
    assert hr.value == pytest.approx(scene.truth.heart_rate_bpm, abs=2.0)
    assert 0.0 < hr.quality <= 1.0
    rr = s.estimates[Metric.RESPIRATORY_RATE.value]
    assert rr.value == pytest.approx(14.0, abs=2.0)
    sdnn = s.estimates[Metric.HRV_SDNN.value]
    assert sdnn.value == pytest.approx(scene.truth.sdnn_ms, abs=15.0)
    for est in s.estimates.values():
        assert isinstance(est, MetricEstimate)
        assert 0.0 <= est.quality <= 1.0
        assert (est.value is None) == (est.reason is not None)


def test_snapshot_uses_the_recent_window(positive) -> None:
    engine, scene = positive
    snap = engine.snapshot()
    hr = snap.estimates[Metric.HEART_RATE.value].value
    assert hr == pytest.approx(scene.truth.heart_rate_bpm, abs=4.0)
    assert engine.face_present


def test_uncalibrated_spo2_quality_is_capped(positive) -> None:
    engine, _ = positive
    spo2 = engine.summary().estimates[Metric.SPO2.value]
    assert spo2.quality <= 0.5


def test_face_without_pulse_is_refused() -> None:
    engine, _ = run(SceneConfig(duration_s=12.0, pulse=False, flicker_amplitude=0.02,
                                flicker_hz=1.3, seed=12))  # fmt: skip
    s = engine.summary()
    assert s.reason == "no pulse"
    assert all(e.value is None for e in s.estimates.values())
    assert engine.face_present


def test_no_face_is_refused() -> None:
    engine, _ = run(SceneConfig(duration_s=3.0, face=False, seed=13))
    s = engine.summary()
    assert s.reason == "no face"
    assert s.face_fraction == 0.0
    assert all(e.value is None and e.reason == "no face" for e in s.estimates.values())
    assert not engine.face_present


def test_too_little_data_and_reset() -> None:
    engine, _ = run(SceneConfig(duration_s=2.0, seed=14))
    assert engine.snapshot().reason == "not enough data"
    engine.reset()
    assert engine.summary().reason == "no frames"
    assert not engine.face_present


def test_non_increasing_timestamps_are_dropped() -> None:
    engine = VitalsEngine(FPS)
    frame = np.zeros((480, 640, 3), np.uint8)
    engine.push(frame, 1.0)
    info = engine.push(frame, 1.0)
    assert not info.face_found
    assert engine.dropped_timestamps == 1


def test_hrv_refused_on_short_windows() -> None:
    engine, _ = run(SceneConfig(duration_s=10.0, heart_rate_bpm=70.0, seed=15))
    s = engine.summary()
    assert s.estimates[Metric.HEART_RATE.value].value is not None
    sdnn = s.estimates[Metric.HRV_SDNN.value]
    assert sdnn.value is None
    assert sdnn.reason == "window too short for HRV"


def test_invalid_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="fps"):
        VitalsEngine(0)
    with pytest.raises(ValueError, match="unknown rPPG method"):
        VitalsEngine(FPS, method="ica")
