"""End-to-end tests of ``python -m kiosk_agent.analyze VIDEO --json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiosk_agent.analyze import run_analyze
from kiosk_agent.vitals.synthetic import SceneConfig, SyntheticScene, write_video

pytest.importorskip("skimage")

KEYS = {
    "heart_rate_bpm",
    "respiratory_rate_bpm",
    "hrv_sdnn_ms",
    "hrv_rmssd_ms",
    "spo2_percent",
    "stress_index",
    "quality",
    "reason",
}


@pytest.fixture(scope="module")
def pulse_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """Write a 10 s MJPG video of a face with a known pulse; return path and HR."""
    scene = SyntheticScene(SceneConfig(duration_s=10.0, heart_rate_bpm=78.0, seed=21))
    path = tmp_path_factory.mktemp("analyze") / "face.avi"
    write_video(scene, str(path), "MJPG")
    assert scene.truth.heart_rate_bpm is not None
    return path, scene.truth.heart_rate_bpm


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the analyze module in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "kiosk_agent.analyze", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_json_output_is_one_object_with_the_heart_rate(pulse_video) -> None:
    path, true_hr = pulse_video
    proc = analyze(str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) >= KEYS
    assert result["heart_rate_bpm"] == pytest.approx(true_hr, abs=2.0)
    assert 0.0 < result["quality"] <= 1.0
    assert result["reason"] is None
    # 10 s is too short for HRV: refused with a reason, not guessed.
    assert result["hrv_sdnn_ms"] is None
    assert result["metrics"]["hrv_sdnn_ms"]["reason"] == "window too short for HRV"
    assert result["metrics"]["spo2_percent"]["estimate"] is True


def test_refusal_still_exits_zero(tmp_path: Path, capsys) -> None:
    scene = SyntheticScene(SceneConfig(duration_s=3.0, face=False, seed=22))
    path = tmp_path / "empty.avi"
    write_video(scene, str(path), "MJPG")
    assert run_analyze(str(path), as_json=True) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reason"] == "no face"
    assert result["heart_rate_bpm"] is None
    assert result["quality"] == 0.0


def test_unreadable_input_fails_with_a_message(tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "not-a-video.avi"
    bogus.write_bytes(b"this is not a video")
    proc = analyze(str(bogus), "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "error" in proc.stderr
    assert run_analyze(str(tmp_path / "missing.mp4"), as_json=True) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot open video" in captured.err


def test_table_output_without_json(pulse_video, capsys) -> None:
    path, _ = pulse_video
    assert run_analyze(str(path), as_json=False) == 0
    out = capsys.readouterr().out
    assert "Heart rate" in out
    assert "SpO2 (estimate)" in out


def test_heavily_compressed_video_is_refused(tmp_path: Path, capsys) -> None:
    # XVID at OpenCV's default bitrate keeps ~0.1 bit per pixel: its key-frame
    # artefacts can mimic a pulse, so the whole analysis is refused.
    scene = SyntheticScene(SceneConfig(duration_s=8.0, seed=23))
    path = tmp_path / "xvid.avi"
    write_video(scene, str(path), "XVID")
    assert run_analyze(str(path), as_json=True) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reason"] == "video too compressed for rPPG"
    assert all(result[k] is None for k in KEYS - {"quality", "reason"})
