"""Speed benchmark of the vitals engine on one core.

1. Offline: ``analyze`` throughput (decode + face tracking + skin means + the final
   summary) on a 640x480 @ 30 fps MJPG file, in frames per second.
2. Live: the share of one core used to process a 30 fps stream in real time (capture
   thread decoding the file at its frame rate, ``push`` per frame, ``snapshot`` at
   1 Hz), as process CPU time over wall time; with a face, and with nobody in front
   of the camera (the detector searches every few frames).

The process is pinned to one CPU and OpenCV to one thread.
Usage: .venv/bin/python bench/rppg_speed.py [--quick]. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Final

import cv2

from kiosk_agent.analyze import analyze_video
from kiosk_agent.sources import VideoSource
from kiosk_agent.vitals import VitalsEngine
from kiosk_agent.vitals.synthetic import SceneConfig, SyntheticScene, write_video

FPS: Final = 30.0
SNAPSHOT_PERIOD_S: Final = 1.0
SEED: Final = 4242


def _pin_one_core() -> None:
    """Pin the process to one CPU and OpenCV to one thread."""
    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def offline(path: str, frames: int) -> dict[str, Any]:
    """Time analyze on the file; return frames per second."""
    start = time.perf_counter()
    summary, read, _ = analyze_video(path)
    elapsed = time.perf_counter() - start
    return {"frames": read, "seconds": round(elapsed, 2),
            "fps": round(read / elapsed, 1),
            "heart_rate": summary.estimates["heart_rate"].value}  # fmt: skip


def live(path: str, seconds: float) -> dict[str, Any]:
    """Process the file as a live 30 fps stream; return the CPU share of one core."""
    source = VideoSource(path, realtime_file=True)
    engine = VitalsEngine(FPS)
    source.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    next_snapshot = wall0 + SNAPSHOT_PERIOD_S
    frames = 0
    try:
        while time.perf_counter() - wall0 < seconds:
            frame = source.read()
            if frame is None:
                break
            engine.push(frame.image, frame.timestamp_s)
            frames += 1
            if time.perf_counter() >= next_snapshot:
                engine.snapshot()
                next_snapshot += SNAPSHOT_PERIOD_S
    finally:
        source.stop()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"frames": frames, "wall_s": round(wall, 1),
            "cpu_share_of_one_core": round(cpu / wall, 3),
            "dropped": source.dropped}  # fmt: skip


def main() -> int:
    """Run both measurements and print one JSON summary line last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, < 1 min")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    _pin_one_core()
    duration = 10.0 if args.quick else 30.0

    fd, path = tempfile.mkstemp(suffix=".avi")
    os.close(fd)
    fd, empty = tempfile.mkstemp(suffix=".avi")
    os.close(fd)
    try:
        scene = SyntheticScene(SceneConfig(duration_s=duration, seed=SEED))
        write_video(scene, path, "MJPG")
        nobody = SyntheticScene(SceneConfig(duration_s=duration / 2, face=False))
        write_video(nobody, empty, "MJPG")
        result: dict[str, Any] = {"bench": "rppg_speed", "quick": args.quick,
                                  "resolution": "640x480", "codec": "MJPG"}  # fmt: skip
        result["analyze"] = offline(path, scene.n_frames)
        print(f"analyze: {result['analyze']}")
        result["live_30fps"] = live(path, duration)
        print(f"live: {result['live_30fps']}")
        result["live_30fps_no_face"] = live(empty, duration / 2)
        print(f"live, no face: {result['live_30fps_no_face']}")
    finally:
        os.unlink(path)
        os.unlink(empty)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
