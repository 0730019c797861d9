"""The vitals engine: frames in, vital-sign estimates (or refusals) out.

``push`` runs per frame (face tracking and the skin colour mean, well under 1 ms at
640x480); ``snapshot`` and ``summary`` run the signal chain on the buffered colour
trace: resampling, rPPG pulse extraction, band-pass, spectrum and SNR, beats, HRV,
respiration and the SpO2 estimate. Every metric is either a value with a quality in
0..1, or None with a reason; nothing is guessed when there is no face, no pulse, too
much motion or too little signal.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from kiosk_agent.vitals.beats import Beats, detect_beats
from kiosk_agent.vitals.face import FaceTracker
from kiosk_agent.vitals.hrv import baevsky_stress_index, rmssd_ms, sdnn_ms
from kiosk_agent.vitals.quality import (
    SNR_REFUSE_DB,
    clamp01,
    pulse_snr_db,
    snr_quality,
)
from kiosk_agent.vitals.resp import respiratory_rate
from kiosk_agent.vitals.signals import (
    PULSE_BAND_HZ,
    bandpass,
    detrend,
    global_pos,
    pulse_frequency,
    pulse_method,
    resample_uniform,
    spectrum,
)
from kiosk_agent.vitals.spo2 import Spo2Calibration, estimate_spo2
from vitals_contract import METRICS, Metric

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

SCAN_SECONDS: Final = 30.0
MIN_PULSE_SECONDS: Final = 6.0  # fewer than ~5 beats at rest: no heart rate yet
HRV_MIN_SECONDS: Final = 20.0  # ultra-short SDNN/RMSSD need >= 20-30 s (Munoz 2015)
HRV_MIN_CLEAN_FRACTION: Final = 0.8
# Beat timing jitter grows as the pulse SNR falls and inflates SDNN and RMSSD; below
# this pulse quality (SNR 3 dB with the default mapping) HRV is refused.
HRV_MIN_PULSE_QUALITY: Final = 0.5
HR_MIN_CLEAN_FRACTION: Final = 0.6
HR_MIN_CLEAN_IBIS: Final = 4
HR_SPECTRUM_AGREEMENT_BPM: Final = 5.0  # beat-based vs spectral rate
MIN_FACE_FRACTION: Final = 0.8  # of the frames in the analysed span
MAX_MOTION_FRACTION: Final = 0.2
MAX_GAP_SECONDS: Final = (
    0.5  # longer face gaps split the trace; the latest part is used
)
FACE_PRESENT_SECONDS: Final = 1.0
FACE_PRESENT_FRACTION: Final = 0.5
MIN_SKIN_LEVEL_DN: Final = 3.0  # mean skin level (8-bit) below which nothing is seen
PULSE_DETREND_CUTOFF_HZ: Final = 0.3  # well below the pulse band
RESP_DETREND_CUTOFF_HZ: Final = 0.05
SPO2_UNCALIBRATED_MAX_QUALITY: Final = 0.5
BUFFER_MARGIN: Final = 1.5  # buffer holds this many times the longest span
PER_MINUTE: Final = 60.0


@dataclass(frozen=True)
class MetricEstimate:
    """One metric's value (None when refused), quality 0..1 and refusal reason."""

    value: float | None
    quality: float
    reason: str | None


@dataclass(frozen=True)
class VitalsSnapshot:
    """Estimates keyed by ``vitals_contract.Metric`` value, with an overall reason."""

    estimates: dict[str, MetricEstimate]
    face_fraction: float
    reason: str | None  # overall refusal: "no face", "no pulse", "motion", ...


@dataclass(frozen=True)
class FrameInfo:
    """What ``push`` saw in one frame."""

    face_found: bool
    motion: bool


@dataclass(frozen=True)
class _Trace:
    """A uniformly resampled colour trace ready for analysis."""

    t0_s: float
    fs: float
    rgb: FloatArray  # (N, 3) float64, mean skin R, G, B
    face_fraction: float
    motion_fraction: float


def _refused(reason: str, quality: float = 0.0) -> MetricEstimate:
    """Return a refused estimate."""
    return MetricEstimate(None, clamp01(quality), reason)


def _checked(metric: Metric, value: float, quality: float) -> MetricEstimate:
    """Return an estimate, refused when outside the contract's plausible range."""
    info = METRICS[metric]
    if not math.isfinite(value):
        return _refused(f"{metric.value} not computable", quality)
    if not info.min_value <= value <= info.max_value:
        return _refused(f"{metric.value} outside plausible range", quality)
    return MetricEstimate(float(value), clamp01(quality), None)


def _all_refused(reason: str, face_fraction: float) -> VitalsSnapshot:
    """Return a snapshot refusing every metric for one reason."""
    estimates = {m.value: _refused(reason) for m in Metric}
    return VitalsSnapshot(estimates, face_fraction, reason)


class VitalsEngine:
    """Estimate vital signs from BGR frames of a face.

    Args:
        fps: nominal camera frame rate, Hz; the analysis resamples to it.
        method: rPPG method, "pos" (default), "chrom" or "green".
        window_seconds: span of the sliding heart-rate and SpO2 estimate.
        scan_seconds: span of ``summary`` and of the snapshot's HRV and respiration.
        detect_every: run the face detector every this many frames.
        clahe_fallback: retry detection after CLAHE when the plain cascade fails.
        spo2_calibration: red/blue ratio-of-ratios calibration (see ``spo2``).
    """

    def __init__(
        self,
        fps: float,
        method: str = "pos",
        window_seconds: float = 10.0,
        *,
        scan_seconds: float = SCAN_SECONDS,
        detect_every: int | None = None,
        clahe_fallback: bool = True,
        spo2_calibration: Spo2Calibration | None = None,
    ) -> None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.fps = float(fps)
        self.method = method
        self._extract = pulse_method(method)
        self.window_seconds = float(window_seconds)
        self.scan_seconds = float(scan_seconds)
        self.spo2_calibration = spo2_calibration or Spo2Calibration()
        kwargs = {} if detect_every is None else {"detect_every": detect_every}
        self.tracker = FaceTracker(clahe_fallback=clahe_fallback, **kwargs)
        longest = max(self.window_seconds, self.scan_seconds)
        self._capacity = math.ceil(BUFFER_MARGIN * longest * self.fps)
        self.reset()

    def reset(self) -> None:
        """Forget all frames and the tracked face (start of a new scan)."""
        self.tracker.reset()
        self._t: deque[float] = deque(maxlen=self._capacity)
        self._rgb: deque[tuple[float, float, float]] = deque(maxlen=self._capacity)
        self._face: deque[bool] = deque(maxlen=self._capacity)
        self._motion: deque[bool] = deque(maxlen=self._capacity)
        self.dropped_timestamps = 0

    @property
    def face_present(self) -> bool:
        """Return True when a face was found in most frames of the last second."""
        if not self._t:
            return False
        last = self._t[-1]
        recent = [
            face
            for t, face in zip(reversed(self._t), reversed(self._face), strict=True)
            if last - t <= FACE_PRESENT_SECONDS
        ]
        return sum(recent) >= FACE_PRESENT_FRACTION * len(recent)

    def push(self, frame_bgr: NDArray[np.uint8], timestamp_s: float) -> FrameInfo:
        """Add one BGR frame (H, W, 3) uint8 taken at timestamp_s seconds."""
        if self._t and timestamp_s <= self._t[-1]:
            self.dropped_timestamps += 1
            logger.debug("frame with non-increasing timestamp dropped")
            return FrameInfo(face_found=False, motion=False)
        dt = timestamp_s - self._t[-1] if self._t else 1.0 / self.fps
        obs = self.tracker.update(frame_bgr, dt)
        found = obs.rgb is not None
        self._t.append(float(timestamp_s))
        self._rgb.append(obs.rgb if obs.rgb is not None else (0.0, 0.0, 0.0))
        self._face.append(found)
        self._motion.append(obs.motion)
        return FrameInfo(face_found=found, motion=obs.motion)

    def snapshot(self) -> VitalsSnapshot:
        """Estimate from the recent window: HR and SpO2 over window_seconds, HRV,
        stress and respiration over up to scan_seconds (refused until long enough)."""
        short = self._analyse(self.window_seconds)
        if short.reason is not None:
            return short
        long = self._analyse(self.scan_seconds)
        estimates = dict(long.estimates)
        for m in (Metric.HEART_RATE, Metric.SPO2):
            estimates[m.value] = short.estimates[m.value]
        return VitalsSnapshot(estimates, short.face_fraction, None)

    def summary(self) -> VitalsSnapshot:
        """Estimate every metric over the whole scan (the last scan_seconds)."""
        return self._analyse(self.scan_seconds)

    # -- analysis ---------------------------------------------------------------------

    def _trace(self, span_s: float) -> _Trace | str:
        """Return the resampled colour trace of the last span_s seconds, or a reason."""
        if not self._t:
            return "no frames"
        t = np.fromiter(self._t, float)
        keep = t >= t[-1] - span_s
        t = t[keep]
        face = np.fromiter(self._face, bool)[keep]
        motion = np.fromiter(self._motion, bool)[keep]
        rgb = np.asarray(self._rgb, dtype=float)[keep]
        face_fraction = float(face.mean())
        if face_fraction < MIN_FACE_FRACTION:
            return "no face"
        motion_fraction = float(motion[face].mean())
        if motion_fraction > MAX_MOTION_FRACTION:
            return "motion"

        # Use the face frames after the last long gap.
        t, rgb = t[face], rgb[face]
        gaps = np.flatnonzero(np.diff(t) > MAX_GAP_SECONDS)
        if len(gaps):
            t, rgb = t[gaps[-1] + 1 :], rgb[gaps[-1] + 1 :]
        if len(t) < 2 or t[-1] - t[0] < MIN_PULSE_SECONDS:
            return "not enough data"
        if float(rgb.mean(axis=0).min()) < MIN_SKIN_LEVEL_DN:
            return "too dark"
        grid, uniform = resample_uniform(t, rgb, self.fps)
        return _Trace(float(grid[0]), self.fps, uniform, face_fraction, motion_fraction)

    def _analyse(self, span_s: float) -> VitalsSnapshot:
        """Run the signal chain on the last span_s seconds."""
        trace = self._trace(span_s)
        if isinstance(trace, str):
            ff = float(np.mean(self._face)) if self._face else 0.0
            return _all_refused(trace, ff)
        fs, rgb = trace.fs, trace.rgb

        # Pulse and its spectrum.
        pulse = bandpass(
            detrend(self._extract(rgb, fs), fs, PULSE_DETREND_CUTOFF_HZ), fs
        )
        freqs, power = spectrum(pulse, fs, PULSE_BAND_HZ)
        pulse_hz = pulse_frequency(freqs, power)
        snr_db = pulse_snr_db(freqs, power, pulse_hz)
        if snr_db < SNR_REFUSE_DB:
            logger.debug("no pulse: SNR %.1f dB", snr_db)
            return _all_refused("no pulse", trace.face_fraction)
        q_pulse = snr_quality(snr_db) * (1.0 - trace.motion_fraction)

        # Beats and heart rate; beats must agree with the spectrum.
        beats = detect_beats(pulse, fs, trace.t0_s, PER_MINUTE * pulse_hz)
        clean = beats.clean_ibi_s
        if (
            len(clean) < HR_MIN_CLEAN_IBIS
            or beats.clean_fraction < HR_MIN_CLEAN_FRACTION
        ):
            return _all_refused("low quality", trace.face_fraction)
        hr = PER_MINUTE / float(np.mean(clean))
        if abs(hr - PER_MINUTE * pulse_hz) > HR_SPECTRUM_AGREEMENT_BPM:
            return _all_refused("low quality", trace.face_fraction)
        q_hr = q_pulse * beats.clean_fraction

        estimates = {Metric.HEART_RATE.value: _checked(Metric.HEART_RATE, hr, q_hr)}
        estimates |= self._hrv(beats, len(rgb) / fs, q_pulse)
        estimates[Metric.RESPIRATORY_RATE.value] = self._resp(trace, beats, q_pulse)
        estimates[Metric.SPO2.value] = self._spo2(trace, q_pulse)
        return VitalsSnapshot(estimates, trace.face_fraction, None)

    def _hrv(
        self, beats: Beats, duration_s: float, q: float
    ) -> dict[str, MetricEstimate]:
        """Return SDNN, RMSSD and the stress index, or refusals with reasons."""
        keys = (Metric.HRV_SDNN, Metric.HRV_RMSSD, Metric.STRESS_INDEX)
        if duration_s < HRV_MIN_SECONDS:
            return {m.value: _refused("window too short for HRV") for m in keys}
        if beats.clean_fraction < HRV_MIN_CLEAN_FRACTION:
            return {m.value: _refused("too many irregular beats", q) for m in keys}
        if q < HRV_MIN_PULSE_QUALITY:
            return {m.value: _refused("pulse too weak for HRV", q) for m in keys}
        quality = q * beats.clean_fraction
        clean = beats.clean_ibi_s
        return {
            Metric.HRV_SDNN.value: _checked(Metric.HRV_SDNN, sdnn_ms(clean), quality),
            Metric.HRV_RMSSD.value: _checked(
                Metric.HRV_RMSSD, rmssd_ms(beats.ibi_s, beats.ibi_ok), quality
            ),
            Metric.STRESS_INDEX.value: _checked(
                Metric.STRESS_INDEX, baevsky_stress_index(clean), quality
            ),
        }

    def _resp(self, trace: _Trace, beats: Beats, q: float) -> MetricEstimate:
        """Return the respiratory rate estimate or a refusal."""
        baseline = detrend(global_pos(trace.rgb), trace.fs, RESP_DETREND_CUTOFF_HZ)
        est = respiratory_rate(baseline, trace.fs, beats, trace.t0_s)
        if est.rate_bpm is None:
            return _refused(est.reason or "no respiration", est.quality * q)
        return _checked(Metric.RESPIRATORY_RATE, est.rate_bpm, est.quality * q)

    def _spo2(self, trace: _Trace, q: float) -> MetricEstimate:
        """Return the SpO2 estimate (uncalibrated unless configured) or a refusal."""
        value, reason = estimate_spo2(trace.rgb, trace.fs, self.spo2_calibration)
        if value is None:
            return _refused(reason or "no SpO2", q)
        if not self.spo2_calibration.calibrated:
            q = min(q, SPO2_UNCALIBRATED_MAX_QUALITY)
        return _checked(Metric.SPO2, value, q)
