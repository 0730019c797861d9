"""Pulse extraction from skin colour traces: POS, CHROM and GREEN, plus filters.

Every function takes uniformly sampled arrays; ``fs`` is the sampling rate in Hz. The
colour trace ``rgb`` is float64 (N, 3): mean skin R, G, B per frame, any positive
scale. The pulse signals returned are oriented so that more blood is positive
(systolic peaks point up).

References:
    W. Verkruysse, L. O. Svaasand, J. S. Nelson, "Remote plethysmographic imaging using
    ambient light", Opt. Express 16 (2008) 21434. (GREEN)
    G. de Haan, V. Jeanne, "Robust pulse rate from chrominance-based rPPG", IEEE Trans.
    Biomed. Eng. 60 (2013) 2878. (CHROM)
    W. Wang, A. C. den Brinker, S. Stuijk, G. de Haan, "Algorithmic principles of remote
    PPG", IEEE Trans. Biomed. Eng. 64 (2017) 1479. (POS)
    M. P. Tarvainen, P. O. Ranta-aho, P. A. Karjalainen, "An advanced detrending method
    with application to HRV analysis", IEEE Trans. Biomed. Eng. 49 (2002) 172.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from numpy.typing import NDArray
from scipy import signal

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

PULSE_BAND_HZ: Final = (0.7, 4.0)  # 42-240 /min, the usual rPPG band (Wang 2017)
BANDPASS_ORDER: Final = 4  # Butterworth order per edge, applied forward-backward
# Window of the per-window colour normalisation: 1.6 s, about one cardiac cycle at
# the lowest rate (Wang 2017, sec. IV-A, l = 32 frames at 20 fps).
POS_WINDOW_SECONDS: Final = 1.6
CHROM_WINDOW_SECONDS: Final = 1.6  # de Haan & Jeanne 2013 use the same scale
# POS projection plane (Wang 2017, eq. 10).
POS_PROJECTION: Final = np.array([[0.0, 1.0, -1.0], [-2.0, 1.0, 1.0]])
# CHROM chrominance signals X = 3R - 2G, Y = 1.5R + G - 1.5B (de Haan 2013, eq. 9).
CHROM_X: Final = np.array([3.0, -2.0, 0.0])
CHROM_Y: Final = np.array([1.5, 1.0, -1.5])
SPECTRUM_PAD_SECONDS: Final = 120.0  # zero-padding for a fine peak grid
# A pulse with a strong dicrotic wave can have more power at twice the heart rate
# than at it; a subharmonic peak with at least this share of the main peak's power
# is taken as the fundamental.
SUBHARMONIC_POWER_RATIO: Final = 0.5
SUBHARMONIC_TOLERANCE: Final = 0.1  # relative search window around f/k
SUBHARMONIC_DIVISORS: Final = (3, 2)  # lowest candidate first
METHODS: Final = ("pos", "chrom", "green")


def bandpass(
    x: FloatArray, fs: float, band: tuple[float, float] = PULSE_BAND_HZ
) -> FloatArray:
    """Band-pass x (N,) at fs Hz with a zero-phase Butterworth filter."""
    sos = signal.butter(BANDPASS_ORDER, band, btype="bandpass", fs=fs, output="sos")
    padlen = min(len(x) - 1, 3 * (2 * len(sos) + 1))
    return np.asarray(signal.sosfiltfilt(sos, x, padlen=padlen), dtype=np.float64)


def lowpass(x: FloatArray, fs: float, cutoff_hz: float) -> FloatArray:
    """Low-pass x (N,) at fs Hz with a zero-phase Butterworth filter."""
    sos = signal.butter(BANDPASS_ORDER, cutoff_hz, btype="lowpass", fs=fs, output="sos")
    padlen = min(len(x) - 1, 3 * (2 * len(sos) + 1))
    return np.asarray(signal.sosfiltfilt(sos, x, padlen=padlen), dtype=np.float64)


def detrend(x: FloatArray, fs: float, cutoff_hz: float) -> FloatArray:
    """Remove the slow trend of x (N,) below about cutoff_hz (Tarvainen 2002).

    The smoothness-priors trend solves (I + lambda^2 D2' D2) z = x with the second
    difference matrix D2 (eq. 6); its cut-off is near omega = lambda^(-1/2) rad per
    sample, so lambda = (fs / (2 pi cutoff))^2. A sparse solve keeps this O(N).
    """
    n = len(x)
    if n < 3:
        return x - np.mean(x)
    lam = (fs / (2 * np.pi * cutoff_hz)) ** 2
    d2 = scipy.sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n))
    system = scipy.sparse.identity(n) + lam**2 * (d2.T @ d2)
    trend = scipy.sparse.linalg.spsolve(system.tocsc(), x)
    return np.asarray(x - trend, dtype=np.float64)


def _windows(rgb: FloatArray, fs: float, seconds: float) -> tuple[FloatArray, int]:
    """Return sliding windows (M, L, 3) of rgb normalised by their means, and L."""
    length = max(2, int(np.ceil(seconds * fs)))
    length = min(length, len(rgb))
    win = np.lib.stride_tricks.sliding_window_view(rgb, length, axis=0)
    win = np.moveaxis(win, -1, 1)  # (M, L, 3)
    return win / win.mean(axis=1, keepdims=True), length


def _overlap_add(parts: FloatArray, n: int, step: int = 1) -> FloatArray:
    """Sum windows (M, L) placed every `step` samples into a signal (n,)."""
    out = np.zeros(n)
    length = parts.shape[1]
    for k in range(length):
        out[k : k + step * len(parts) : step] += parts[:, k]
    return out


def pos(rgb: FloatArray, fs: float) -> FloatArray:
    """Return the POS pulse (N,) of a colour trace rgb (N, 3) at fs Hz (Wang 2017).

    Algorithm 1 of the paper: temporal normalisation per 1.6 s window, projection on
    the plane orthogonal to skin tone, alpha tuning, overlap-add with a hop of one
    frame. Wang's projection gives -BVP for skin (the G - B term is negative when
    blood rises), so the sign is flipped to make systolic peaks positive.
    """
    cn, _ = _windows(rgb, fs, POS_WINDOW_SECONDS)
    s = np.einsum("pc,mlc->mpl", POS_PROJECTION, cn)  # (M, 2, L), eq. 10
    std = s.std(axis=2)
    alpha = std[:, 0] / np.maximum(std[:, 1], np.finfo(float).tiny)
    h = s[:, 0] + alpha[:, None] * s[:, 1]  # eq. 11
    h -= h.mean(axis=1, keepdims=True)
    return -_overlap_add(h, len(rgb))


def chrom(rgb: FloatArray, fs: float) -> FloatArray:
    """Return the CHROM pulse (N,) of rgb (N, 3) at fs Hz (de Haan & Jeanne 2013).

    Per 1.6 s window with a hop of half a window: normalise, form X and Y (eq. 9),
    band-pass both, combine S = Xf - alpha Yf (eq. 11), Hann-weight and overlap-add.
    """
    cn, length = _windows(rgb, fs, CHROM_WINDOW_SECONDS)
    step = max(1, length // 2)
    cn = cn[::step]
    x = cn @ CHROM_X
    y = cn @ CHROM_Y
    sos = signal.butter(
        BANDPASS_ORDER, PULSE_BAND_HZ, btype="bandpass", fs=fs, output="sos"
    )
    padlen = min(length - 1, 3 * (2 * len(sos) + 1))
    xf = signal.sosfiltfilt(sos, x, axis=1, padlen=padlen)
    yf = signal.sosfiltfilt(sos, y, axis=1, padlen=padlen)
    alpha = xf.std(axis=1) / np.maximum(yf.std(axis=1), np.finfo(float).tiny)
    s = (xf - alpha[:, None] * yf) * np.hanning(length)[None, :]
    return _overlap_add(s, len(rgb), step)


def green(rgb: FloatArray, fs: float) -> FloatArray:
    """Return the GREEN pulse (N,) of rgb (N, 3) at fs Hz (Verkruysse 2008).

    The green channel over its mean, minus one; negated because blood absorbs green
    light, so more blood means a darker skin.
    """
    del fs  # the same signature as the other methods
    g = rgb[:, 1]
    return -(g / np.mean(g) - 1.0)


def pulse_method(name: str) -> Callable[[FloatArray, float], FloatArray]:
    """Return the pulse-extraction function called `name` (pos, chrom or green)."""
    methods = {"pos": pos, "chrom": chrom, "green": green}
    try:
        return methods[name]
    except KeyError as exc:
        raise ValueError(f"unknown rPPG method {name!r}; use one of {METHODS}") from exc


def global_pos(rgb: FloatArray) -> FloatArray:
    """Return the POS projection of rgb (N, 3) normalised over the whole trace.

    Unlike ``pos``, whose 1.6 s normalisation removes everything slower than the
    pulse, this keeps slow blood-volume changes (respiration) while still cancelling
    changes of light intensity, which are equal in all normalised channels.
    """
    cn = rgb / rgb.mean(axis=0, keepdims=True)
    s = cn @ POS_PROJECTION.T  # (N, 2)
    alpha = s[:, 0].std() / max(s[:, 1].std(), np.finfo(float).tiny)
    return np.asarray(-(s[:, 0] + alpha * s[:, 1]), dtype=np.float64)


def spectrum(
    x: FloatArray, fs: float, band: tuple[float, float]
) -> tuple[FloatArray, FloatArray]:
    """Return (frequencies Hz, power) of a Hann-windowed, zero-padded x within band."""
    n_fft = max(len(x), int(SPECTRUM_PAD_SECONDS * fs))
    power = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x)), n_fft)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1.0 / fs)
    inside = (freqs >= band[0]) & (freqs <= band[1])
    return freqs[inside].astype(np.float64), power[inside].astype(np.float64)


def dominant_frequency(freqs: FloatArray, power: FloatArray) -> float:
    """Return the frequency (Hz) of the spectral peak, refined by a parabola."""
    i = int(np.argmax(power))
    if 0 < i < len(power) - 1:
        a, b, c = np.log(power[i - 1 : i + 2] + np.finfo(float).tiny)
        denom = a - 2 * b + c
        offset = 0.0 if denom == 0 else 0.5 * (a - c) / denom
        return float(freqs[i] + offset * (freqs[1] - freqs[0]))
    return float(freqs[i])


def pulse_frequency(freqs: FloatArray, power: FloatArray) -> float:
    """Return the pulse rate (Hz) of a band spectrum: its peak, or a subharmonic.

    A pulse with a sharp systolic upstroke and a dicrotic wave can carry more power
    at its 2nd or 3rd harmonic than at its rate; a peak at f/3 or f/2 with at least
    SUBHARMONIC_POWER_RATIO of the main peak's power is taken as the fundamental.
    """
    f = dominant_frequency(freqs, power)
    for divisor in SUBHARMONIC_DIVISORS:
        centre = f / divisor
        lo = (1 - SUBHARMONIC_TOLERANCE) * centre
        hi = (1 + SUBHARMONIC_TOLERANCE) * centre
        near = (freqs >= lo) & (freqs <= hi)
        if lo < freqs[0] or not np.any(near):
            continue
        if power[near].max() >= SUBHARMONIC_POWER_RATIO * power.max():
            sub = int(np.flatnonzero(near)[0] + np.argmax(power[near]))
            lo_i, hi_i = max(sub - 1, 0), min(sub + 2, len(power))
            return dominant_frequency(freqs[lo_i:hi_i], power[lo_i:hi_i])
    return f


def resample_uniform(
    t_s: FloatArray, values: FloatArray, fs: float
) -> tuple[FloatArray, FloatArray]:
    """Resample values (N, ...) taken at times t_s (N,) onto a uniform grid at fs."""
    grid = np.arange(t_s[0], t_s[-1] + 0.5 / fs, 1.0 / fs)
    if values.ndim == 1:
        return grid, np.interp(grid, t_s, values)
    cols = [np.interp(grid, t_s, values[:, c]) for c in range(values.shape[1])]
    return grid, np.stack(cols, axis=1)
