"""Accuracy benchmark of the vitals engine.

1. Synthetic set with ground truth (bench/synthvideo.py): HR, RR and SDNN errors on
   positives (six skin tones incl. Monk 10, head motion, illumination drift and
   flicker, raw / MJPG / XVID), refusal rate on negatives (no face; face, no pulse).
2. Face detection per skin tone, with and without the CLAHE fallback.
3. Real recordings: beat detection F1 of the contact PPG against ECG R-peaks
   (shared/data/physio/sample_vitals_1.csv), with heartpy's peaks side by side, and
   HR / SDNN / RMSSD of this engine's beat chain vs heartpy on heartpy's own data.

Usage: .venv/bin/python bench/rppg_accuracy.py [--quick]. The last line is one JSON
object with the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Final

import numpy as np
from scipy import signal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthvideo import SKIN_TONES, bench_cases, run_case

from kiosk_agent.vitals.beats import detect_beats
from kiosk_agent.vitals.face import FaceTracker
from kiosk_agent.vitals.hrv import rmssd_ms, sdnn_ms
from kiosk_agent.vitals.signals import (
    PULSE_BAND_HZ,
    bandpass,
    pulse_frequency,
    spectrum,
)
from kiosk_agent.vitals.synthetic import SceneConfig, SyntheticScene

logger = logging.getLogger("bench.rppg_accuracy")

# The workplace's shared data sits beside the repository (../shared).
PHYSIO_CSV: Final = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "physio"
    / "sample_vitals_1.csv"
)
PHYSIO_FS: Final = 30.0  # one row per video frame (README)
MATCH_TOLERANCE_S: Final = 0.15  # beat match window after removing the median lag
ECG_REFRACTORY_S: Final = 0.3
HEARTPY_DATA_FS: Final = 100.0  # heartpy docs: data.csv is sampled at 100 Hz
ECG_PROMINENCE_FRACTION: Final = 0.4


def metric_errors(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Return MAE, RMSE, max error and count over rows with both value and truth."""
    pairs = [(r[key], r[f"true_{key}"]) for r in rows
             if r[key] is not None and r[f"true_{key}"] is not None]  # fmt: skip
    if not pairs:
        return {"n": 0, "mae": None, "rmse": None, "max": None}
    err = np.array([a - b for a, b in pairs])
    return {
        "n": len(pairs),
        "mae": round(float(np.mean(np.abs(err))), 2),
        "rmse": round(float(np.sqrt(np.mean(err**2))), 2),
        "max": round(float(np.max(np.abs(err))), 2),
    }


def synthetic_part(quick: bool) -> dict[str, Any]:
    """Run the synthetic set on two processes and summarise it."""
    n_pos, n_neg, duration = (4, 2, 15.0) if quick else (36, 12, 30.0)
    cases = bench_cases(n_pos, n_neg, duration)
    with multiprocessing.Pool(2) as pool:
        rows = pool.map(run_case, cases)
    print(f"{'case':16} {'tone':>4} {'codec':5} {'mot':>4} {'HR':>6} {'trueHR':>6} "
          f"{'RR':>5} {'trueRR':>6} {'SDNN':>6} {'true':>6} reason")  # fmt: skip
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{r['name']:16} {r['tone']:>4} {r['codec']:5} {r['motion_px']:>4.0f} "
              f"{f(r['hr']):>6} {f(r['true_hr']):>6} {f(r['rr']):>5} "
              f"{f(r['true_rr']):>6} {f(r['sdnn']):>6} {f(r['true_sdnn']):>6} "
              f"{r['reason'] or ''}")  # fmt: skip

    pos = [r for r in rows if not r["negative"]]
    neg = [r for r in rows if r["negative"]]
    refused_pos = [r for r in pos if r["hr"] is None]
    per_tone = {
        str(t): metric_errors([r for r in pos if r["tone"] == t], "hr")
        for t in SKIN_TONES
    }
    return {
        "positives": len(pos),
        "positives_refused": len(refused_pos),
        "hr": metric_errors(pos, "hr"),
        "hr_off_by_more_than_5": sum(
            1 for r in pos if r["hr"] is not None and abs(r["hr"] - r["true_hr"]) > 5
        ),
        "rr": metric_errors(pos, "rr"),
        "rr_refused": sum(1 for r in pos if r["rr"] is None),
        "sdnn": metric_errors(pos, "sdnn"),
        "sdnn_refused": sum(1 for r in pos if r["sdnn"] is None),
        "rmssd": metric_errors(pos, "rmssd"),
        "hr_by_tone": per_tone,
        "negatives": len(neg),
        "negatives_refused_rate": (
            round(sum(1 for r in neg if r["hr"] is None) / len(neg), 3) if neg else None
        ),
    }


def detection_part(frames_per_tone: int) -> dict[str, Any]:
    """Return the face-found rate per Monk tone with and without CLAHE fallback."""
    out: dict[str, Any] = {}
    for tone in range(1, 11):
        scene = SyntheticScene(SceneConfig(duration_s=frames_per_tone / 30.0,
                                           skin_tone=tone, head_motion_pixels=3.0,
                                           seed=tone))  # fmt: skip
        frames = scene.frames()
        rates = {}
        for label, fallback in (("haar", False), ("haar+clahe", True)):
            tracker = FaceTracker(detect_every=1, clahe_fallback=fallback)
            found = sum(tracker.update(f, 1 / 30).box is not None for f in frames)
            rates[label] = round(found / len(frames), 3)
        out[str(tone)] = rates
    return out


def _ecg_r_peaks(ecg: np.ndarray, fs: float) -> np.ndarray:
    """Return R-peak times (s) of an ECG, choosing the polarity with taller peaks."""
    x = ecg - np.median(ecg)
    if abs(np.percentile(x, 1)) > abs(np.percentile(x, 99)):
        x = -x
    peaks, _ = signal.find_peaks(
        x, distance=int(ECG_REFRACTORY_S * fs),
        prominence=ECG_PROMINENCE_FRACTION * (np.percentile(x, 99) - np.median(x)),
    )  # fmt: skip
    return peaks / fs


def beat_f1(reference_s: np.ndarray, detected_s: np.ndarray) -> dict[str, float]:
    """Return F1 of detected beats vs reference beats after removing the median lag.

    A PPG peak follows its R-peak by the pulse transit time (~0.2-0.3 s), so each
    reference beat is matched to the nearest detected beat after shifting by the
    median lag, within MATCH_TOLERANCE_S, one to one.
    """
    if len(reference_s) == 0 or len(detected_s) == 0:
        return {"f1": 0.0, "tp": 0, "fp": len(detected_s), "fn": len(reference_s)}
    nxt = [detected_s[detected_s >= r].min() - r for r in reference_s
           if np.any(detected_s >= r)]  # fmt: skip
    lag = float(np.median(nxt)) if nxt else 0.0
    used = np.zeros(len(detected_s), bool)
    tp = 0
    span = (detected_s.min() - MATCH_TOLERANCE_S, detected_s.max() + MATCH_TOLERANCE_S)
    ref = reference_s[(reference_s + lag >= span[0]) & (reference_s + lag <= span[1])]
    for r in ref:
        d = np.abs(detected_s - (r + lag))
        d[used] = np.inf
        j = int(np.argmin(d))
        if d[j] <= MATCH_TOLERANCE_S:
            used[j] = True
            tp += 1
    fp, fn = int((~used).sum()), len(ref) - tp
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"f1": round(f1, 4), "tp": tp, "fp": fp, "fn": fn,
            "lag_s": round(lag, 3)}  # fmt: skip


def _our_beats(ppg: np.ndarray, fs: float) -> Any:
    """Run this engine's beat chain on a contact PPG."""
    pulse = bandpass(ppg - np.mean(ppg), fs)
    freqs, power = spectrum(pulse, fs, PULSE_BAND_HZ)
    return detect_beats(pulse, fs, 0.0, 60.0 * pulse_frequency(freqs, power))


def real_part() -> dict[str, Any]:
    """Beat F1 on the physio sample vs ECG, and side-by-side results with heartpy."""
    data = np.genfromtxt(PHYSIO_CSV, delimiter=",", names=True)
    ppg, ecg = data["ppg"], data["ecg"]
    r_peaks = _ecg_r_peaks(ecg, PHYSIO_FS)
    ours = _our_beats(ppg, PHYSIO_FS)
    result: dict[str, Any] = {
        "physio_beats_ecg": len(r_peaks),
        "physio_f1_ours": beat_f1(r_peaks, ours.times_s),
        "physio_hr_ours": round(60.0 / float(np.mean(ours.clean_ibi_s)), 1),
        "physio_hr_ecg_reference": round(float(data["hr_ecg"][0]), 1),
        "physio_sdnn_ours": round(sdnn_ms(ours.clean_ibi_s), 1),
        "physio_sdnn_ecg_reference": round(float(data["hrv_sdnn_ecg"][0]), 1),
    }
    try:
        import heartpy as hp
    except ImportError:
        result["heartpy"] = "not installed"
        return result

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wd, m = hp.process(ppg, PHYSIO_FS)
        hp_peaks = np.array(wd["peaklist"])[np.array(wd["binary_peaklist"]) == 1]
        result["physio_f1_heartpy"] = beat_f1(r_peaks, hp_peaks / PHYSIO_FS)
        result["physio_hr_heartpy"] = round(float(m["bpm"]), 1)
        result["physio_sdnn_heartpy"] = round(float(m["sdnn"]), 1)

        side = {}
        data_dir = Path(hp.__file__).parent / "data"
        for name, fs in (("data.csv", HEARTPY_DATA_FS), ("data2.csv", None)):
            path = str(data_dir / name)
            if fs is None:  # data2.csv carries a millisecond timer column
                raw = hp.get_data(path, column_name="hr")
                timer = hp.get_data(path, column_name="timer")
                fs = float(hp.get_samplerate_mstimer(timer))
            else:
                raw = hp.get_data(path)
            raw = np.asarray(raw, float)
            wd, m = hp.process(raw, fs)
            b = _our_beats(raw, fs)
            side[name] = {
                "fs": round(fs, 1),
                "hr_ours": round(60.0 / float(np.mean(b.clean_ibi_s)), 1),
                "hr_heartpy": round(float(m["bpm"]), 1),
                "sdnn_ours": round(sdnn_ms(b.clean_ibi_s), 1),
                "sdnn_heartpy": round(float(m["sdnn"]), 1),
                "rmssd_ours": round(rmssd_ms(b.ibi_s, b.ibi_ok), 1),
                "rmssd_heartpy": round(float(m["rmssd"]), 1),
                "beats_ours": len(b.times_s),
                "beats_heartpy": int(np.sum(wd["binary_peaklist"])),
            }
        result["heartpy_data"] = side
    return result


def main() -> int:
    """Run the benchmark and print one JSON summary line last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small set, < 1 min")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    start = time.perf_counter()

    summary: dict[str, Any] = {"bench": "rppg_accuracy", "quick": args.quick}
    summary["synthetic"] = synthetic_part(args.quick)
    summary["face_found_rate_by_tone"] = detection_part(5 if args.quick else 60)
    summary["real"] = real_part()
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
