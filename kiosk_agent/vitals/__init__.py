"""Camera vital signs (rPPG): face tracking, pulse extraction and vital-sign estimates.

``VitalsEngine`` takes BGR frames and returns ``VitalsSnapshot`` objects whose
estimates are keyed by ``vitals_contract.Metric`` values. SpO2 and the stress index
are estimates (uncalibrated SpO2; Baevsky's stress index), as the contract labels them.
"""

from kiosk_agent.vitals.engine import (
    FrameInfo,
    MetricEstimate,
    VitalsEngine,
    VitalsSnapshot,
)
from kiosk_agent.vitals.face import FaceDetectorError
from kiosk_agent.vitals.spo2 import Spo2Calibration

__all__ = [
    "FaceDetectorError",
    "FrameInfo",
    "MetricEstimate",
    "Spo2Calibration",
    "VitalsEngine",
    "VitalsSnapshot",
]
