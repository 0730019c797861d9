"""Unit tests of the pulse extraction, filters and spectral helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk_agent.vitals.signals import (
    PULSE_BAND_HZ,
    bandpass,
    chrom,
    detrend,
    dominant_frequency,
    global_pos,
    green,
    pos,
    pulse_frequency,
    pulse_method,
    resample_uniform,
    spectrum,
)
from kiosk_agent.vitals.synthetic import PBV_SIGNATURE

FS = 30.0
DURATION_S = 20.0


def skin_trace(
    hr_bpm: float, seed: int = 0, light_hz: float | None = None
) -> np.ndarray:
    """Return an RGB trace (N, 3): skin with a pulse along PBV, noise, light change."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(DURATION_S * FS)) / FS
    pulse = np.sin(2 * np.pi * hr_bpm / 60 * t)
    skin = np.array([180.0, 130.0, 100.0])
    rgb = skin * (1 - 0.005 * pulse[:, None] * PBV_SIGNATURE[None, :])
    if light_hz is not None:  # white light: the same relative change in R, G, B
        rgb *= 1 + 0.05 * np.sin(2 * np.pi * light_hz * t)[:, None]
    return rgb + rng.normal(0, 0.02, rgb.shape)


@pytest.mark.parametrize("method", ["pos", "chrom", "green"])
@settings(max_examples=15, deadline=None)
@given(hr=st.floats(45.0, 180.0))
def test_methods_recover_pulse_rate(method: str, hr: float) -> None:
    rgb = skin_trace(hr)
    pulse = bandpass(pulse_method(method)(rgb, FS), FS)
    freqs, power = spectrum(pulse, FS, PULSE_BAND_HZ)
    assert abs(60 * dominant_frequency(freqs, power) - hr) < 1.0


@pytest.mark.parametrize("method", [pos, chrom, green])
def test_methods_point_systolic_peaks_up(method) -> None:
    # More blood darkens the skin; the pulse signal must rise with blood volume.
    t = np.arange(int(10 * FS)) / FS
    blood = np.sin(2 * np.pi * 1.2 * t)
    rgb = 150.0 * (1 - 0.005 * blood[:, None] * PBV_SIGNATURE[None, :])
    out = bandpass(method(rgb, FS), FS)
    assert np.corrcoef(out, blood)[0, 1] > 0.9


def test_pos_and_chrom_cancel_white_light_flicker() -> None:
    # In-band flicker of the light (2 Hz) with a weaker pulse (1 Hz): POS must see
    # the pulse, while the GREEN channel alone sees the flicker.
    rgb = skin_trace(60.0, light_hz=2.0)
    for method, expect_hz in ((pos, 1.0), (chrom, 1.0), (green, 2.0)):
        freqs, power = spectrum(bandpass(method(rgb, FS), FS), FS, PULSE_BAND_HZ)
        assert dominant_frequency(freqs, power) == pytest.approx(expect_hz, abs=0.05)


@settings(max_examples=25, deadline=None)
@given(
    inside=st.floats(0.9, 3.5),
    outside=st.one_of(st.floats(0.02, 0.3), st.floats(6.0, 14.0)),
)
def test_bandpass_keeps_in_band_and_kills_out_of_band(
    inside: float, outside: float
) -> None:
    t = np.arange(int(DURATION_S * FS)) / FS
    keep = np.sin(2 * np.pi * inside * t)
    kill = np.sin(2 * np.pi * outside * t)
    mid = slice(int(3 * FS), -int(3 * FS))  # away from the edges
    assert np.std(bandpass(keep, FS)[mid]) > 0.8 * np.std(keep[mid])
    assert np.std(bandpass(kill, FS)[mid]) < 0.1 * np.std(kill[mid])


def test_detrend_removes_slow_trend_and_keeps_pulse() -> None:
    t = np.arange(int(DURATION_S * FS)) / FS
    pulse = np.sin(2 * np.pi * 1.2 * t)
    out = detrend(pulse + 0.5 * t, FS, cutoff_hz=0.3)
    mid = slice(int(2 * FS), -int(2 * FS))
    assert np.max(np.abs(out[mid] - pulse[mid])) < 0.15


def test_global_pos_keeps_slow_blood_changes() -> None:
    t = np.arange(int(DURATION_S * FS)) / FS
    breath = np.sin(2 * np.pi * 0.25 * t)
    rgb = 150.0 * (1 - 0.005 * breath[:, None] * PBV_SIGNATURE[None, :])
    assert np.corrcoef(global_pos(rgb), breath)[0, 1] > 0.99


@pytest.mark.parametrize("harmonic", [2, 3])
def test_pulse_frequency_prefers_the_fundamental_over_a_strong_harmonic(
    harmonic: int,
) -> None:
    t = np.arange(int(DURATION_S * FS)) / FS
    x = 0.9 * np.sin(2 * np.pi * 1.0 * t) + np.sin(2 * np.pi * harmonic * t)
    freqs, power = spectrum(x, FS, PULSE_BAND_HZ)
    assert dominant_frequency(freqs, power) == pytest.approx(harmonic, abs=0.02)
    assert pulse_frequency(freqs, power) == pytest.approx(1.0, abs=0.02)


def test_pulse_frequency_keeps_a_fast_pulse_without_subharmonic() -> None:
    t = np.arange(int(DURATION_S * FS)) / FS
    x = np.sin(2 * np.pi * 2.7 * t) + 0.1 * np.sin(2 * np.pi * 0.9 * t)
    freqs, power = spectrum(x, FS, PULSE_BAND_HZ)
    assert pulse_frequency(freqs, power) == pytest.approx(2.7, abs=0.02)


def test_resample_uniform_handles_jittered_timestamps() -> None:
    rng = np.random.default_rng(1)
    t = np.cumsum(rng.uniform(0.025, 0.04, 300))
    values = np.stack([np.sin(t), np.cos(t), t], axis=1)
    grid, out = resample_uniform(t, values, FS)
    assert np.allclose(np.diff(grid), 1 / FS)
    assert np.allclose(out[:, 2], grid, atol=1e-9)
    assert np.allclose(out[:, 0], np.sin(grid), atol=1e-3)


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown rPPG method"):
        pulse_method("ica")
