"""``kiosk-agent analyze VIDEO [--json]``: estimate vital signs from a video file.

Exit status: 0 for any video that was analysed, including refusals (no face, no
pulse); 2 when the input cannot be read. With ``--json`` exactly one JSON object is
printed on stdout; otherwise a progress bar (on a terminal) and a table.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Final

import cv2
import numpy as np

from kiosk_agent.vitals import MetricEstimate, VitalsEngine, VitalsSnapshot
from vitals_contract import METRICS, Metric

logger = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_UNREADABLE: Final = 2
DEFAULT_FPS: Final = 30.0  # when the container does not state a frame rate
MIN_VALID_FPS: Final = 1.0
MAX_VALID_FPS: Final = 240.0
# Lossy video codecs erase the sub-grey-level colour changes of the pulse and add
# periodic artefacts of their own (key-frame refreshes at fps / GOP, which can land in
# the pulse band). Below this many bits per pixel per frame a video is refused;
# 0.3 bit/pixel is about 2.8 Mbit/s at 640x480@30. A conservative reading of McDuff
# et al., "The impact of video compression on remote cardiac pulse measurement using
# imaging photoplethysmography", IEEE FG 2017, where the pulse SNR collapsed at
# low bitrates; motion-JPEG at default quality is ~0.9 bit/pixel.
MIN_BITS_PER_PIXEL: Final = 0.3
# Intra-frame and uncompressed formats have no key-frame artefacts; the bitrate gate
# applies to the others (MPEG-4, H.264, ...).
INTRA_FOURCCS: Final = frozenset(
    {"MJPG", "MJPA", "JPEG", "I420", "IYUV", "YUY2", "YUYV", "UYVY", "Y800", "FFV1",
     "HFYU", "RGB ", "BGR ", "PNG "}
)  # fmt: skip
BITS_PER_KILOBIT: Final = 1000.0
PULSE_REFUSALS: Final = ("no pulse", "low quality")

# JSON key for each metric, with its unit in the name.
JSON_KEYS: Final = {
    Metric.HEART_RATE: "heart_rate_bpm",
    Metric.RESPIRATORY_RATE: "respiratory_rate_bpm",
    Metric.HRV_SDNN: "hrv_sdnn_ms",
    Metric.HRV_RMSSD: "hrv_rmssd_ms",
    Metric.SPO2: "spo2_percent",
    Metric.STRESS_INDEX: "stress_index",
}


class AnalyzeError(RuntimeError):
    """The video cannot be opened or decoded."""


def bits_per_pixel(capture: cv2.VideoCapture, fps: float) -> float | None:
    """Return an inter-frame stream's bits per pixel per frame, else None."""
    code = int(capture.get(cv2.CAP_PROP_FOURCC) or 0)
    fourcc = code.to_bytes(4, "little").decode("latin-1")
    if fourcc.upper() in INTRA_FOURCCS:
        return None
    kbps = float(capture.get(cv2.CAP_PROP_BITRATE) or 0.0)
    width = float(capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0.0)
    height = float(capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0.0)
    if kbps <= 0 or width <= 0 or height <= 0:
        return None
    return kbps * BITS_PER_KILOBIT / (fps * width * height)


def _refuse_all(snapshot: VitalsSnapshot, reason: str) -> VitalsSnapshot:
    """Return the snapshot with every metric refused for one reason."""
    refused = {k: MetricEstimate(None, 0.0, reason) for k in snapshot.estimates}
    return VitalsSnapshot(refused, snapshot.face_fraction, reason)


def _open(video: str) -> tuple[cv2.VideoCapture, float, int]:
    """Open a video file; return the capture, its frame rate and frame count."""
    capture = cv2.VideoCapture(video)
    if not capture.isOpened():
        raise AnalyzeError(f"cannot open video {video!r}")
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    if not MIN_VALID_FPS <= fps <= MAX_VALID_FPS:
        logger.warning("video states %.3g fps; assuming %.0g", fps, DEFAULT_FPS)
        fps = DEFAULT_FPS
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    return capture, fps, max(count, 0)


def analyze_video(
    video: str, progress: Any = None, engine: VitalsEngine | None = None
) -> tuple[VitalsSnapshot, int, float]:
    """Analyse a whole video file; return (summary, frames read, fps).

    The summary covers the whole video (the engine's scan span is set to its length).
    ``progress`` is called with the number of frames read so far, if given.
    """
    capture, fps, count = _open(video)
    bpp = bits_per_pixel(capture, fps)
    try:
        duration = count / fps if count else 0.0
        if engine is None:
            engine = VitalsEngine(fps, scan_seconds=max(duration, 1.0))
        frames = 0
        while True:
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            engine.push(np.asarray(frame, np.uint8), frames / fps)
            frames += 1
            if progress is not None:
                progress(frames)
    except cv2.error as exc:
        raise AnalyzeError(f"cannot decode {video!r}: {exc}") from exc
    finally:
        capture.release()
    if frames == 0:
        raise AnalyzeError(f"no frames could be read from {video!r}")
    summary = engine.summary()
    # The compression explains a missing or doubtful pulse, not a missing face.
    pulse_related = summary.reason in (None, *PULSE_REFUSALS)
    if pulse_related and bpp is not None and bpp < MIN_BITS_PER_PIXEL:
        logger.info("video refused: %.2f bits per pixel", bpp)
        summary = _refuse_all(summary, "video too compressed for rPPG")
    return summary, frames, fps


def snapshot_to_json(snapshot: VitalsSnapshot) -> dict[str, Any]:
    """Return the JSON object for a summary: one key per metric plus quality/reason."""
    out: dict[str, Any] = {}
    for metric, key in JSON_KEYS.items():
        est = snapshot.estimates[metric.value]
        out[key] = None if est.value is None else round(est.value, 2)
    hr = snapshot.estimates[Metric.HEART_RATE.value]
    out["quality"] = round(hr.quality, 3)
    out["reason"] = (
        snapshot.reason if hr.value is not None else (snapshot.reason or hr.reason)
    )
    out["face_fraction"] = round(snapshot.face_fraction, 3)
    out["metrics"] = {
        key: {
            "value": out[key],
            "quality": round(snapshot.estimates[m.value].quality, 3),
            "reason": snapshot.estimates[m.value].reason,
            "estimate": METRICS[m].estimate,
        }
        for m, key in JSON_KEYS.items()
    }
    return out


def _print_table(snapshot: VitalsSnapshot, frames: int, fps: float) -> None:
    """Print a human-readable table of the estimates."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Vital signs ({frames} frames at {fps:.1f} fps)")
    for column in ("metric", "value", "unit", "quality", "note"):
        table.add_column(column)
    for metric in JSON_KEYS:
        info = METRICS[metric]
        est = snapshot.estimates[metric.value]
        value = "-" if est.value is None else f"{est.value:.1f}"
        note = est.reason or ("estimate" if info.estimate else "")
        table.add_row(info.display, value, info.unit, f"{est.quality:.2f}", note)
    console = Console()
    console.print(table)
    if snapshot.reason:
        console.print(f"[bold]Refused:[/bold] {snapshot.reason}")


def run_analyze(video: str, as_json: bool) -> int:
    """Analyse VIDEO and print the result; return the process exit status."""
    try:
        if as_json or not sys.stdout.isatty():
            snapshot, frames, fps = analyze_video(video)
        else:
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                _, _, count = _probe(video)
                task = bar.add_task("analysing", total=count or None)
                snapshot, frames, fps = analyze_video(
                    video, progress=lambda n: bar.update(task, completed=n)
                )
    except AnalyzeError as exc:
        print(f"kiosk-agent analyze: error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE

    if as_json:
        print(json.dumps(snapshot_to_json(snapshot)))
    else:
        _print_table(snapshot, frames, fps)
    return EXIT_OK


def _probe(video: str) -> tuple[str, float, int]:
    """Return (video, fps, frame count) without keeping the file open."""
    capture, fps, count = _open(video)
    capture.release()
    return video, fps, count


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m kiosk_agent.analyze VIDEO [--json]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="kiosk-agent analyze")
    parser.add_argument("video")
    parser.add_argument("--json", action="store_true", dest="as_json")
    args = parser.parse_args(argv)
    return run_analyze(args.video, args.as_json)


if __name__ == "__main__":
    sys.exit(main())
