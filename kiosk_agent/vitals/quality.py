"""Signal quality of a pulse: spectral SNR, mapped to a 0..1 quality.

The SNR is de Haan & Jeanne's (2013, eq. 17): the power within a narrow band around
the pulse frequency and its first harmonic, over the rest of the pulse band, in dB.
White noise in the 0.7-4 Hz band sits near -8 dB with this definition; a clean rPPG
signal at rest is well above 0 dB.

References:
    G. de Haan, V. Jeanne, "Robust pulse rate from chrominance-based rPPG", IEEE Trans.
    Biomed. Eng. 60 (2013) 2878.
"""

from __future__ import annotations

import logging
from typing import Final

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

SNR_HALF_WIDTH_HZ: Final = 0.1  # +-6 /min around the fundamental and the harmonic
SNR_REFUSE_DB: Final = 0.0  # below it there is no usable pulse
SNR_GOOD_DB: Final = 6.0  # at or above it the pulse quality is 1
TEMPLATE_MIN_BEATS: Final = 4


def pulse_snr_db(freqs: FloatArray, power: FloatArray, pulse_hz: float) -> float:
    """Return the SNR (dB) of a pulse at pulse_hz in a band spectrum (freqs, power)."""
    near = (np.abs(freqs - pulse_hz) <= SNR_HALF_WIDTH_HZ) | (
        np.abs(freqs - 2 * pulse_hz) <= SNR_HALF_WIDTH_HZ
    )
    signal_power = float(np.sum(power[near]))
    noise_power = float(np.sum(power[~near]))
    if noise_power <= 0.0:
        return float("inf") if signal_power > 0 else float("-inf")
    if signal_power <= 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal_power / noise_power))


def snr_quality(snr_db: float) -> float:
    """Map an SNR in dB linearly to a quality in [0, 1] between refuse and good."""
    q = (snr_db - SNR_REFUSE_DB) / (SNR_GOOD_DB - SNR_REFUSE_DB)
    return float(np.clip(q, 0.0, 1.0))


def clamp01(x: float) -> float:
    """Clamp x to [0, 1]; NaN becomes 0."""
    return 0.0 if not np.isfinite(x) else float(min(1.0, max(0.0, x)))


def template_correlation(
    pulse: FloatArray, fs: float, t0_s: float, beat_times_s: FloatArray
) -> float:
    """Return the mean correlation of each beat with the average beat (0..1).

    The beat-template signal-quality index of Orphanidou et al. (2015): segments of
    one median IBI centred on each beat of the pulse (N,) at fs Hz are averaged into
    a template; the index is the mean Pearson correlation of the segments with it.
    Clean pulses score above ~0.9, noise well below.

    Reference: C. Orphanidou et al., "Signal-quality indices for the
    electrocardiogram and photoplethysmogram", IEEE J. Biomed. Health Inform. 19
    (2015) 832.
    """
    if len(beat_times_s) < TEMPLATE_MIN_BEATS:
        return 0.0
    half = int(0.5 * float(np.median(np.diff(beat_times_s))) * fs)
    centres = np.round((beat_times_s - t0_s) * fs).astype(int)
    centres = centres[(centres - half >= 0) & (centres + half < len(pulse))]
    if len(centres) < TEMPLATE_MIN_BEATS or half < 1:
        return 0.0
    segments = np.stack([pulse[c - half : c + half + 1] for c in centres])
    template = segments.mean(axis=0)
    seg = segments - segments.mean(axis=1, keepdims=True)
    tpl = template - template.mean()
    denom = np.linalg.norm(seg, axis=1) * np.linalg.norm(tpl)
    corr = np.where(denom > 0, seg @ tpl / np.where(denom > 0, denom, 1.0), 0.0)
    return clamp01(float(np.mean(corr)))
