"""Unit tests of beat detection, artefact rejection, HRV, respiration and SpO2."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk_agent.vitals.beats import detect_beats, reject_artefacts
from kiosk_agent.vitals.hrv import baevsky_stress_index, rmssd_ms, sdnn_ms
from kiosk_agent.vitals.quality import pulse_snr_db, snr_quality, template_correlation
from kiosk_agent.vitals.resp import respiratory_rate
from kiosk_agent.vitals.signals import PULSE_BAND_HZ, bandpass, spectrum
from kiosk_agent.vitals.spo2 import Spo2Calibration, estimate_spo2, ratio_of_ratios
from kiosk_agent.vitals.synthetic import SceneConfig, beat_times, pulse_waveform

FS = 30.0


def synthetic_pulse(
    hr_bpm: float, seed: int, duration_s: float = 30.0, rr_bpm: float = 15.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (t, band-passed pulse, true beat times) with HRV at 30 fps."""
    cfg = SceneConfig(duration_s=duration_s, heart_rate_bpm=hr_bpm,
                      respiratory_rate_bpm=rr_bpm)  # fmt: skip
    beats = beat_times(cfg, np.random.default_rng(seed))
    t = np.arange(int(duration_s * FS)) / FS
    return t, bandpass(pulse_waveform(t, beats), FS), beats


@settings(max_examples=20, deadline=None)
@given(hr=st.floats(45.0, 150.0), seed=st.integers(0, 10_000))
def test_beats_recover_heart_rate_and_beat_times(hr: float, seed: int) -> None:
    t, pulse, truth = synthetic_pulse(hr, seed)
    detected = detect_beats(pulse, FS, 0.0, expected_hr_bpm=hr)
    inside = truth[(truth > 1.0) & (truth < t[-1] - 1.0)]
    # Every true beat away from the edges has a detection at a constant lag (the
    # band-pass shifts the peak of an asymmetric pulse) within 15 ms.
    delta = detected.times_s[None, :] - inside[:, None]
    nearest = delta[np.arange(len(inside)), np.argmin(np.abs(delta), axis=1)]
    assert abs(np.median(nearest)) < 0.05
    assert np.all(np.abs(nearest - np.median(nearest)) < 0.015)
    assert 60 / np.mean(detected.clean_ibi_s) == pytest.approx(hr, abs=2.0)


def test_sdnn_of_detected_beats_matches_truth() -> None:
    t, pulse, truth = synthetic_pulse(70.0, seed=3)
    detected = detect_beats(pulse, FS, 0.0, 70.0)
    true_ibi = np.diff(truth[(truth >= 0) & (truth <= t[-1])])
    assert sdnn_ms(detected.clean_ibi_s) == pytest.approx(sdnn_ms(true_ibi), abs=8.0)


def test_artefact_rejection_drops_missed_and_extra_beats() -> None:
    ibi = np.array([0.8, 0.82, 1.62, 0.79, 0.4, 0.41, 0.81, 0.8, 0.2])
    ok = reject_artefacts(ibi)
    assert ok.tolist() == [True, True, False, True, False, False, True, True, False]


def test_hrv_metrics_on_known_series() -> None:
    ibi = np.array([0.8, 0.9, 0.8, 0.9, 0.8])
    ok = np.ones(5, bool)
    assert sdnn_ms(ibi) == pytest.approx(1000 * np.std(ibi, ddof=1))
    assert rmssd_ms(ibi, ok) == pytest.approx(100.0)
    # A rejected IBI breaks the successive differences around it.
    ok[2] = False
    assert rmssd_ms(ibi, ok) == pytest.approx(100.0)
    assert rmssd_ms(np.array([0.8, 1.6, 0.8]), np.array([True, False, True])) != (
        pytest.approx(800.0)
    )


def test_baevsky_stress_index_formula() -> None:
    # 30 IBIs: 20 in the 0.80-0.85 s bin, range 0.70-0.95 s.
    ibi = np.array([0.82] * 20 + [0.70] * 5 + [0.95] * 5)
    si = baevsky_stress_index(ibi)
    amo = 100 * 20 / 30
    assert si == pytest.approx(amo / (2 * 0.825 * 0.25), rel=1e-6)
    assert np.isnan(baevsky_stress_index(ibi[:10]))


def test_snr_separates_pulse_from_noise() -> None:
    _, pulse, _ = synthetic_pulse(72.0, seed=1)
    noise = bandpass(np.random.default_rng(2).normal(size=len(pulse)), FS)
    for x, good in ((pulse, True), (noise, False)):
        freqs, power = spectrum(x, FS, PULSE_BAND_HZ)
        snr = pulse_snr_db(freqs, power, freqs[np.argmax(power)])
        assert (snr > 0) is good
    assert snr_quality(10.0) == 1.0
    assert snr_quality(-10.0) == 0.0


def test_template_correlation_is_high_for_clean_beats() -> None:
    _, pulse, truth = synthetic_pulse(72.0, seed=1)
    assert template_correlation(pulse, FS, 0.0, truth[1:-1]) > 0.9


@pytest.mark.parametrize("rr", [9.0, 15.0, 22.0])
def test_respiratory_rate_from_modulations(rr: float) -> None:
    t, pulse, _ = synthetic_pulse(72.0, seed=5, rr_bpm=rr)
    breath = np.sin(2 * np.pi * rr / 60 * t)
    detected = detect_beats(pulse * (1 + 0.2 * breath), FS, 0.0, 72.0)
    est = respiratory_rate(0.5 * breath, FS, detected, 0.0)
    assert est.rate_bpm == pytest.approx(rr, abs=1.5)
    assert 0.0 <= est.quality <= 1.0


def test_respiratory_rate_refuses_short_windows() -> None:
    t, pulse, _ = synthetic_pulse(72.0, seed=5, duration_s=8.0)
    est = respiratory_rate(np.zeros_like(t), FS, detect_beats(pulse, FS), 0.0)
    assert est.rate_bpm is None
    assert est.reason == "window too short for respiration"


def test_spo2_ratio_of_ratios_and_calibration() -> None:
    t = np.arange(int(20 * FS)) / FS
    p = np.sin(2 * np.pi * 1.2 * t)
    rgb = np.stack([200 * (1 - 0.004 * p), 150 * (1 - 0.01 * p), 120 * (1 - 0.008 * p)],
                   axis=1)  # fmt: skip
    assert ratio_of_ratios(rgb, FS) == pytest.approx(0.5, rel=0.02)
    value, reason = estimate_spo2(rgb, FS, Spo2Calibration(a=110, b=25))
    assert value == pytest.approx(97.5, abs=0.5)
    assert reason is None
    value, reason = estimate_spo2(rgb, FS, Spo2Calibration(a=60, b=25))
    assert value is None
    assert "range" in (reason or "")
