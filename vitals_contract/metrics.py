"""The vital-sign metrics a kiosk reports: units, codes and estimate labels.

This table is the single source for the bridge's validation, the API's FHIR mapping
and the dashboard's labels. Units are UCUM; codes are LOINC where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Metric(StrEnum):
    """A vital sign the kiosk can report."""

    HEART_RATE = "heart_rate"
    RESPIRATORY_RATE = "respiratory_rate"
    HRV_SDNN = "hrv_sdnn"
    HRV_RMSSD = "hrv_rmssd"
    SPO2 = "spo2"
    STRESS_INDEX = "stress_index"


@dataclass(frozen=True, slots=True)
class MetricInfo:
    """Static facts about one metric."""

    unit: str  # UCUM code
    display: str
    min_value: float  # physiologically plausible bounds, inclusive
    max_value: float
    estimate: bool  # True: shown and exported as an estimate, never as a measurement
    loinc: str | None


METRICS: dict[Metric, MetricInfo] = {
    Metric.HEART_RATE: MetricInfo("/min", "Heart rate", 20, 250, False, "8867-4"),
    Metric.RESPIRATORY_RATE: MetricInfo(
        "/min", "Respiratory rate", 2, 60, False, "9279-1"
    ),
    Metric.HRV_SDNN: MetricInfo("ms", "HRV SDNN", 0, 500, False, "80404-7"),
    Metric.HRV_RMSSD: MetricInfo("ms", "HRV RMSSD", 0, 500, False, None),
    Metric.SPO2: MetricInfo("%", "SpO2 (estimate)", 50, 100, True, "59408-5"),
    Metric.STRESS_INDEX: MetricInfo(
        "1", "Stress indicator (estimate)", 0, 5000, True, None
    ),
}
