"""Beat detection, inter-beat intervals and artefact rejection on a pulse signal.

The band-passed pulse (N,) at fs Hz is interpolated by a cubic spline to
``UPSAMPLE_HZ`` so that beat times are not quantised to the camera's frame period
(33 ms at 30 fps would dominate an SDNN of 30-50 ms), then systolic peaks are found with
a refractory distance set from the spectral heart rate. IBIs that are implausible or
jump from their neighbours are rejected with a median rule in the spirit of
Malik et al. (1996) and Kubios (Tarvainen et al. 2014).

References:
    M. Malik et al., "Heart rate variability: standards of measurement, physiological
    interpretation and clinical use", Circulation 93 (1996) 1043.
    M. P. Tarvainen et al., "Kubios HRV - heart rate variability analysis software",
    Comput. Methods Programs Biomed. 113 (2014) 210.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray
from scipy import interpolate, signal

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

UPSAMPLE_HZ: Final = 240.0  # beat-timing grid, about 4 ms
MIN_HR_BPM: Final = 40.0
MAX_HR_BPM: Final = 240.0
# Peaks closer than this fraction of the expected IBI are one beat (dicrotic wave).
REFRACTORY_FRACTION: Final = 0.55
# Minimum peak prominence as a fraction of the signal's 5-95 % range.
PROMINENCE_FRACTION: Final = 0.15
RANGE_PERCENTILES: Final = (5.0, 95.0)
# An IBI further than this from the median of its neighbours is an artefact.
IBI_MEDIAN_TOLERANCE: Final = 0.25
IBI_GLOBAL_TOLERANCE: Final = 0.35  # first pass, around the median of the scan
IBI_MEDIAN_NEIGHBOURS: Final = 9  # wide enough that two bad IBIs do not bias it


@dataclass(frozen=True)
class Beats:
    """Detected beats of a pulse signal.

    Attributes:
        times_s: (M,) float64 beat (systolic peak) times, seconds.
        amplitudes: (M,) float64 peak minus preceding trough, signal units.
        ibi_s: (M-1,) float64 inter-beat intervals, seconds.
        ibi_ok: (M-1,) bool, True for intervals kept by artefact rejection.
    """

    times_s: FloatArray
    amplitudes: FloatArray
    ibi_s: FloatArray
    ibi_ok: NDArray[np.bool_]

    @property
    def clean_ibi_s(self) -> FloatArray:
        """Return the kept IBIs (K,) in seconds."""
        return self.ibi_s[self.ibi_ok]

    @property
    def clean_fraction(self) -> float:
        """Return the fraction of IBIs kept (0 when there are none)."""
        return float(np.mean(self.ibi_ok)) if len(self.ibi_ok) else 0.0


def detect_beats(
    pulse: FloatArray,
    fs: float,
    t0_s: float = 0.0,
    expected_hr_bpm: float | None = None,
) -> Beats:
    """Detect systolic peaks in a band-passed pulse (N,) sampled at fs Hz from t0_s."""
    if len(pulse) < 4:
        return _no_beats()

    # Interpolate onto a fine grid; the band-limited pulse is smooth at fs.
    t = np.arange(len(pulse)) / fs
    fine_t = np.arange(0.0, t[-1], 1.0 / UPSAMPLE_HZ)
    fine = interpolate.CubicSpline(t, pulse)(fine_t)

    # Peaks: refractory distance from the expected rate, prominence from the range.
    max_hr = MAX_HR_BPM if expected_hr_bpm is None else expected_hr_bpm
    distance = max(1, int(REFRACTORY_FRACTION * 60.0 / max_hr * UPSAMPLE_HZ))
    lo, hi = np.percentile(fine, RANGE_PERCENTILES)
    peaks, props = signal.find_peaks(
        fine, distance=distance, prominence=PROMINENCE_FRACTION * (hi - lo)
    )
    if len(peaks) < 2:
        return _no_beats()
    times = fine_t[peaks] + _parabolic_offsets(fine, peaks) / UPSAMPLE_HZ + t0_s
    troughs = np.array(
        [
            fine[max(0, b) : p + 1].min()
            for b, p in zip(props["left_bases"], peaks, strict=True)
        ]
    )
    amplitudes = fine[peaks] - troughs

    ibi = np.diff(times)
    return Beats(times, amplitudes, ibi, reject_artefacts(ibi))


def reject_artefacts(ibi_s: FloatArray) -> NDArray[np.bool_]:
    """Return a mask (K,) of IBIs that are plausible and agree with their neighbours.

    Two passes: IBIs far from the median of all plausible IBIs are set aside, then
    each IBI is compared with the median of the remaining ones among its
    ``IBI_MEDIAN_NEIGHBOURS`` nearest, so a run of bad beats cannot bias its own
    reference.
    """
    if len(ibi_s) == 0:
        return np.zeros(0, dtype=bool)
    plausible = (ibi_s >= 60.0 / MAX_HR_BPM) & (ibi_s <= 60.0 / MIN_HR_BPM)
    if not plausible.any():
        return plausible
    overall = float(np.median(ibi_s[plausible]))
    first = plausible & (np.abs(ibi_s - overall) <= IBI_GLOBAL_TOLERANCE * overall)
    half = IBI_MEDIAN_NEIGHBOURS // 2
    ok = np.zeros(len(ibi_s), dtype=bool)
    for i in np.flatnonzero(plausible):
        lo, hi = max(0, i - half), min(len(ibi_s), i + half + 1)
        ref = ibi_s[lo:hi][first[lo:hi]]
        local = float(np.median(ref)) if len(ref) else overall
        ok[i] = abs(ibi_s[i] - local) <= IBI_MEDIAN_TOLERANCE * local
    return ok


def _parabolic_offsets(x: FloatArray, peaks: NDArray[np.intp]) -> FloatArray:
    """Return sub-sample offsets (M,) of peaks from a parabola through 3 samples."""
    inner = (peaks > 0) & (peaks < len(x) - 1)
    offsets = np.zeros(len(peaks))
    p = peaks[inner]
    a, b, c = x[p - 1], x[p], x[p + 1]
    denom = a - 2 * b + c
    safe = np.where(denom == 0, 1.0, denom)
    offsets[inner] = np.where(denom == 0, 0.0, 0.5 * (a - c) / safe)
    return offsets


def _no_beats() -> Beats:
    """Return an empty detection."""
    empty = np.zeros(0)
    return Beats(empty, empty, empty, np.zeros(0, dtype=bool))
