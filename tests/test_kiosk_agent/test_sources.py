"""Tests of the frame sources: OpenCV capture thread and the synthetic face."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from kiosk_agent.sources import (
    SourceError,
    SyntheticFaceSource,
    VideoSource,
    parse_device,
)
from kiosk_agent.vitals.synthetic import SceneConfig

FPS = 30.0
N_FRAMES = 45
SIZE = (160, 120)


@pytest.fixture(scope="module")
def numbered_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write a small MJPG file whose frame k has grey level 5 * k."""
    path = tmp_path_factory.mktemp("video") / "numbered.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), FPS, SIZE)
    for k in range(N_FRAMES):
        writer.write(np.full((SIZE[1], SIZE[0], 3), 5 * k, np.uint8))
    writer.release()
    return path


def level(image: np.ndarray) -> int:
    """Return the frame number encoded in a frame's grey level."""
    return round(float(image.mean()) / 5)


def test_parse_device() -> None:
    assert parse_device("0") == 0
    assert parse_device("rtsp://cam/stream") == "rtsp://cam/stream"
    assert parse_device("clip.avi") == "clip.avi"


def test_file_read_fast_delivers_every_frame_in_order(numbered_video: Path) -> None:
    source = VideoSource(str(numbered_video))
    source.start()
    try:
        got = []
        while (frame := source.read()) is not None:
            got.append(level(frame.image))
    finally:
        source.stop()
    assert got == list(range(N_FRAMES))
    assert source.dropped == 0
    assert source.fps == pytest.approx(FPS)


def test_slow_consumer_drops_oldest_and_counts(numbered_video: Path) -> None:
    source = VideoSource(str(numbered_video), buffer_frames=3, realtime_file=True)
    source.start()
    try:
        time.sleep(1.0)  # about 30 frames arrive while nobody reads
        first = source.read()
    finally:
        source.stop()
    assert first is not None
    assert source.dropped > 10
    # The buffer kept only the newest frames, so the first read is recent.
    assert level(first.image) >= source.captured - 3 - 1


def test_unreadable_source_raises(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot open"):
        VideoSource(str(tmp_path / "missing.avi")).start()


def test_synthetic_source_fast_and_with_truth() -> None:
    pytest.importorskip("skimage")
    source = SyntheticFaceSource(
        SceneConfig(duration_s=5.0, heart_rate_bpm=66.0), realtime=False
    )
    source.start()
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    assert len(frames) == 150
    assert frames[0].image.shape == (480, 640, 3)
    assert frames[1].timestamp_s == pytest.approx(1 / FPS)
    assert source.truth.respiratory_rate_bpm == 15.0
    assert source.truth.heart_rate_bpm == pytest.approx(66.0, abs=6.0)


def test_synthetic_source_realtime_paces_frames() -> None:
    pytest.importorskip("skimage")
    source = SyntheticFaceSource(SceneConfig(duration_s=0.3), realtime=True, loop=True)
    source.start()
    start = time.monotonic()
    for _ in range(12):  # beyond the 9 frames of the scene: it loops
        assert source.read() is not None
    elapsed = time.monotonic() - start
    source.stop()
    assert elapsed >= 11 / FPS - 0.01
    assert source.read() is None
