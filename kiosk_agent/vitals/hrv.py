"""Heart-rate variability from clean inter-beat intervals: SDNN, RMSSD, stress index.

Inputs are IBIs in seconds, float64 (K,), with a mask of the ones kept by artefact
rejection (``beats.reject_artefacts``). Outputs are in milliseconds, except the stress
index, which is dimensionless.

References:
    Task Force of the ESC and NASPE, "Heart rate variability: standards of measurement,
    physiological interpretation and clinical use", Circulation 93 (1996) 1043.
    R. M. Baevsky, A. G. Chernikova, "Heart rate variability analysis: physiological
    foundations and main methods", Cardiometry 10 (2017) 66.
"""

from __future__ import annotations

import logging
from typing import Final

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

MS_PER_S: Final = 1000.0
BAEVSKY_BIN_S: Final = 0.05  # 50 ms histogram bins (Baevsky & Chernikova 2017)
MIN_IBIS_FOR_STRESS: Final = 20  # a histogram of fewer beats has no stable mode


def sdnn_ms(ibi_s: FloatArray) -> float:
    """Return the standard deviation of clean IBIs (K,) in ms (Task Force 1996)."""
    return MS_PER_S * float(np.std(ibi_s, ddof=1))


def rmssd_ms(ibi_s: FloatArray, ok: NDArray[np.bool_]) -> float:
    """Return the RMS of successive IBI differences (ms), using only clean pairs.

    A difference counts when both of its IBIs are clean and adjacent in the original
    series, so a rejected beat does not create a false jump.
    """
    diffs = np.diff(ibi_s)[ok[:-1] & ok[1:]]
    if len(diffs) == 0:
        return float("nan")
    return MS_PER_S * float(np.sqrt(np.mean(diffs**2)))


def baevsky_stress_index(ibi_s: FloatArray) -> float:
    """Return Baevsky's stress index SI = AMo / (2 Mo MxDMn) of clean IBIs (K,).

    AMo: percentage of IBIs in the modal 50 ms bin; Mo: the modal IBI (s); MxDMn: the
    IBI range (s). An estimate of sympathetic tone, not a diagnosis; Kubios reports
    its square root, this returns the original index (rest: about 50-150).
    """
    if len(ibi_s) < MIN_IBIS_FOR_STRESS:
        return float("nan")
    lo = np.floor(ibi_s.min() / BAEVSKY_BIN_S) * BAEVSKY_BIN_S
    edges = np.arange(lo, ibi_s.max() + BAEVSKY_BIN_S, BAEVSKY_BIN_S)
    counts, edges = np.histogram(ibi_s, bins=edges)
    mode_bin = int(np.argmax(counts))
    amo_percent = 100.0 * counts[mode_bin] / len(ibi_s)
    mo_s = 0.5 * (edges[mode_bin] + edges[mode_bin + 1])
    mxdmn_s = max(float(ibi_s.max() - ibi_s.min()), BAEVSKY_BIN_S)
    return float(amo_percent / (2.0 * mo_s * mxdmn_s))
