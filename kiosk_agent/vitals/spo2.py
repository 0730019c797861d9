"""SpO2 ESTIMATE from an RGB camera: ratio of ratios with a configurable calibration.

A pulse oximeter compares the pulsatile fraction (AC/DC) of two wavelengths. An RGB
camera has no infrared channel, so the red channel is compared with the blue one, as
in Scully et al. (2012): R = (AC_red / DC_red) / (AC_blue / DC_blue) and
SpO2 = A - B R. A and B depend on the camera's spectral response and the light, and
must be fitted per kiosk model against a reference oximeter (including hypoxic
subjects). The default is the textbook linear approximation for red/infrared
oximeters, SpO2 = 110 - 25 R (Webster 1997, ch. 4), which is NOT a calibration for
any camera: values from it are uncalibrated estimates and are reported only as such.

References:
    C. G. Scully et al., "Physiological parameter monitoring from optical recordings
    with a mobile phone", IEEE Trans. Biomed. Eng. 59 (2012) 303.
    J. G. Webster (ed.), "Design of Pulse Oximeters", IOP Publishing, 1997.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from kiosk_agent.vitals.signals import bandpass

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

DEFAULT_A: Final = 110.0  # Webster 1997 red/IR approximation, not a camera calibration
DEFAULT_B: Final = 25.0
# Only values in the range a calibration is usually validated over are reported
# (ISO 80601-2-61 requires accuracy claims over 70-100 %).
VALID_RANGE_PERCENT: Final = (70.0, 100.0)


@dataclass(frozen=True, slots=True)
class Spo2Calibration:
    """Linear calibration SpO2 = a - b R of the red/blue ratio of ratios."""

    a: float = DEFAULT_A
    b: float = DEFAULT_B
    calibrated: bool = False  # True only after fitting against a reference oximeter


def ratio_of_ratios(rgb: FloatArray, fs: float) -> float:
    """Return R = (AC/DC)_red / (AC/DC)_blue of a colour trace rgb (N, 3) at fs Hz.

    AC is the standard deviation of the band-passed channel, DC its mean.
    """
    dc = rgb.mean(axis=0)
    ac = np.array([bandpass(rgb[:, c], fs).std() for c in (0, 2)])
    red, blue = ac[0] / dc[0], ac[1] / dc[2]
    return float(red / blue) if blue > 0 else float("nan")


def estimate_spo2(
    rgb: FloatArray, fs: float, calibration: Spo2Calibration
) -> tuple[float | None, str | None]:
    """Return (SpO2 % estimate or None, reason) for rgb (N, 3) at fs Hz."""
    r = ratio_of_ratios(rgb, fs)
    if not np.isfinite(r):
        return None, "no pulsatile signal in blue"
    value = calibration.a - calibration.b * r
    lo, hi = VALID_RANGE_PERCENT
    if not lo <= value <= hi:
        return None, "SpO2 estimate outside the calibrated range"
    return float(value), None
