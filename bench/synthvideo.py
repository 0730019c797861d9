"""The synthetic benchmark set: scenes with ground truth, and running one through
the engine (optionally through a video codec round trip).

The bench set is drawn from ``BENCH_SEED``; development used other seeds, and no
engine constant was fitted to this set.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Final

import cv2
import numpy as np

from kiosk_agent.analyze import analyze_video
from kiosk_agent.vitals import VitalsEngine
from kiosk_agent.vitals.synthetic import SceneConfig, SyntheticScene
from vitals_contract import Metric

BENCH_SEED: Final = 20_261_203
SKIN_TONES: Final = (1, 3, 5, 7, 9, 10)  # Monk scale; 10 is the darkest
CODECS: Final = (None, "MJPG", "XVID")  # None: raw frames, no compression
HR_RANGE_BPM: Final = (48.0, 120.0)
RR_RANGE_BPM: Final = (8.0, 24.0)


@dataclass(frozen=True)
class Case:
    """One bench case: a scene and the codec it goes through."""

    name: str
    config: SceneConfig
    codec: str | None
    negative: bool


def bench_cases(n_positive: int, n_negative: int, duration_s: float) -> list[Case]:
    """Draw the bench set: positives over tones, motion, light and codecs; negatives."""
    rng = np.random.default_rng(BENCH_SEED)
    cases = []
    for i in range(n_positive):
        cfg = SceneConfig(
            duration_s=duration_s,
            heart_rate_bpm=float(rng.uniform(*HR_RANGE_BPM)),
            respiratory_rate_bpm=float(rng.uniform(*RR_RANGE_BPM)),
            rsa_fraction=float(rng.uniform(0.02, 0.07)),
            lf_fraction=float(rng.uniform(0.01, 0.05)),
            ibi_jitter_s=float(rng.uniform(0.005, 0.025)),
            skin_tone=SKIN_TONES[i % len(SKIN_TONES)],
            pulse_amplitude=float(rng.uniform(0.004, 0.008)),
            head_motion_pixels=float(rng.choice([0.0, 2.0, 5.0])),
            illumination_drift=float(rng.uniform(-0.2, 0.2)),
            flicker_amplitude=float(rng.choice([0.0, 0.01, 0.03])),
            flicker_hz=float(rng.uniform(0.5, 12.0)),
            noise_sigma_dn=float(rng.uniform(1.0, 3.0)),
            seed=int(rng.integers(2**31)),
        )
        codec = CODECS[(i // len(SKIN_TONES)) % len(CODECS)]
        cases.append(Case(f"pos{i:02d}", cfg, codec, negative=False))
    for i in range(n_negative):
        base = SceneConfig(
            duration_s=duration_s,
            skin_tone=SKIN_TONES[i % len(SKIN_TONES)],
            head_motion_pixels=float(rng.choice([0.0, 2.0])),
            illumination_drift=float(rng.uniform(-0.2, 0.2)),
            flicker_amplitude=float(rng.choice([0.0, 0.01, 0.03])),
            flicker_hz=float(rng.uniform(0.7, 4.0)),  # in the pulse band on purpose
            seed=int(rng.integers(2**31)),
        )
        no_face = i % 2 == 0
        cfg = dataclasses.replace(base, face=not no_face, pulse=False)
        kind = "noface" if no_face else "nopulse"
        codec = CODECS[i % len(CODECS)]
        cases.append(Case(f"neg{i:02d}-{kind}", cfg, codec, negative=True))
    return cases


def run_case(case: Case) -> dict[str, Any]:
    """Run one case through the engine; return truth, estimates and detector stats."""
    scene = SyntheticScene(case.config)
    engine = VitalsEngine(case.config.fps, scan_seconds=case.config.duration_s)
    if case.codec is None:
        for i in range(scene.n_frames):
            engine.push(scene.frame(i), float(scene.times_s[i]))
        summary = engine.summary()
    else:
        suffix = ".avi"
        fd, path = tempfile.mkstemp(suffix=suffix)
        os.close(fd)
        try:
            writer = cv2.VideoWriter(
                path, cv2.VideoWriter.fourcc(*case.codec), case.config.fps,
                (scene.frame(0).shape[1], scene.frame(0).shape[0]),
            )  # fmt: skip
            for i in range(scene.n_frames):
                writer.write(scene.frame(i))
            writer.release()
            summary, _, _ = analyze_video(path, engine=engine)
        finally:
            os.unlink(path)

    est = {k: v.value for k, v in summary.estimates.items()}
    truth = scene.truth
    stats = engine.tracker.stats
    return {
        "name": case.name,
        "negative": case.negative,
        "tone": case.config.skin_tone,
        "codec": case.codec or "raw",
        "motion_px": case.config.head_motion_pixels,
        "reason": summary.reason,
        "hr": est[Metric.HEART_RATE.value],
        "rr": est[Metric.RESPIRATORY_RATE.value],
        "sdnn": est[Metric.HRV_SDNN.value],
        "rmssd": est[Metric.HRV_RMSSD.value],
        "hr_quality": summary.estimates[Metric.HEART_RATE.value].quality,
        "true_hr": truth.heart_rate_bpm,
        "true_rr": truth.respiratory_rate_bpm,
        "true_sdnn": truth.sdnn_ms,
        "true_rmssd": truth.rmssd_ms,
        "detect_attempts": stats.attempts,
        "detect_plain": stats.plain,
        "detect_clahe": stats.clahe,
        "detect_missed": stats.missed,
    }
