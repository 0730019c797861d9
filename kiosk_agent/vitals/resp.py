"""Respiratory rate from the pulse: baseline, amplitude and interval modulations fused.

Breathing modulates the photoplethysmogram in three ways (Karlen et al. 2013):
the baseline (respiratory-induced intensity variation, RIIV), the beat amplitude
(RIAV) and the beat interval (RIFV, respiratory sinus arrhythmia). Each is resampled
to ``RESAMPLE_HZ``, its normalised spectrum in ``RESP_BAND_HZ`` is summed with the
others, and the fused peak is the rate. The estimate is refused when the individual
peaks disagree (Karlen's "smart fusion": standard deviation above 4 /min).

References:
    W. Karlen, S. Raman, J. M. Ansermino, G. A. Dumont, "Multiparameter respiratory
    rate estimation from the photoplethysmogram", IEEE Trans. Biomed. Eng. 60 (2013)
    1946.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from kiosk_agent.vitals.beats import Beats
from kiosk_agent.vitals.signals import detrend, dominant_frequency, lowpass, spectrum

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

RESP_BAND_HZ: Final = (0.1, 0.7)  # 6-42 /min
RESAMPLE_HZ: Final = 4.0  # common rate of the modulation series (Karlen 2013)
BASELINE_LOWPASS_HZ: Final = 0.7  # keeps breathing, removes the pulse
DETREND_CUTOFF_HZ: Final = 0.05  # below the slowest breathing rate
FUSION_MAX_SD_BPM: Final = 4.0  # Karlen 2013, smart fusion threshold
MIN_SECONDS: Final = 15.0  # at least a few breaths at the slowest rate
MIN_BEATS: Final = 12
PER_MINUTE: Final = 60.0


@dataclass(frozen=True, slots=True)
class RespEstimate:
    """A respiratory rate (/min) or a refusal, with quality 0..1."""

    rate_bpm: float | None
    quality: float
    reason: str | None


def respiratory_rate(
    baseline: FloatArray, fs: float, beats: Beats, t0_s: float
) -> RespEstimate:
    """Estimate the respiratory rate from a slow pulse signal and detected beats.

    Args:
        baseline: (N,) float64 pulse signal that keeps slow blood-volume changes
            (``signals.global_pos``), sampled at fs Hz starting at t0_s seconds.
        fs: sampling rate of baseline, Hz.
        beats: beats detected in the band-passed pulse of the same span.
        t0_s: time of baseline[0], seconds (the clock of beats.times_s).
    """
    duration = len(baseline) / fs
    if duration < MIN_SECONDS:
        return RespEstimate(None, 0.0, "window too short for respiration")
    if len(beats.times_s) < MIN_BEATS:
        return RespEstimate(None, 0.0, "too few beats for respiration")

    # The three modulation series on one 4 Hz grid.
    grid = np.arange(beats.times_s[0], beats.times_s[-1], 1.0 / RESAMPLE_HZ)
    t = t0_s + np.arange(len(baseline)) / fs
    riiv = np.interp(grid, t, lowpass(baseline, fs, BASELINE_LOWPASS_HZ))
    riav = np.interp(grid, beats.times_s, beats.amplitudes)
    ok = beats.ibi_ok
    mid = 0.5 * (beats.times_s[1:] + beats.times_s[:-1])
    rifv = np.interp(grid, mid[ok], beats.ibi_s[ok]) if ok.sum() > 1 else None
    series = [s for s in (riiv, riav, rifv) if s is not None]

    # Normalised spectra, summed; individual peaks for the agreement check.
    fused = None
    peaks = []
    for s in series:
        freqs, power = spectrum(detrend(s, RESAMPLE_HZ, DETREND_CUTOFF_HZ), RESAMPLE_HZ,
                                RESP_BAND_HZ)  # fmt: skip
        total = float(np.sum(power))
        if total <= 0:
            continue
        power = power / total
        peaks.append(PER_MINUTE * dominant_frequency(freqs, power))
        fused = power if fused is None else fused + power
    if fused is None or len(peaks) < 2:
        return RespEstimate(None, 0.0, "no respiratory modulation")

    rate = PER_MINUTE * dominant_frequency(freqs, fused)
    spread = float(np.std(peaks))
    quality = float(np.clip(1.0 - spread / FUSION_MAX_SD_BPM, 0.0, 1.0))
    if spread > FUSION_MAX_SD_BPM:
        # Karlen's fusion keeps the estimate only if the modulations agree; allow the
        # case where two of three agree closely and the third is the outlier.
        agreeing = [p for p in peaks if abs(p - rate) <= FUSION_MAX_SD_BPM / 2]
        if len(agreeing) < 2:
            return RespEstimate(None, quality, "respiratory modulations disagree")
        rate = float(np.mean(agreeing))
        quality = max(quality, 0.5 * len(agreeing) / len(peaks))
    return RespEstimate(rate, quality, None)
