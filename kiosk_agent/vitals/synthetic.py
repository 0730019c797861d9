"""Synthetic face videos with a known pulse and respiration, for demos and tests.

The face is the astronaut photograph shipped with scikit-image (Eileen Collins, NASA,
public domain), imported lazily because scikit-image is an optional dependency (the
``demo`` and ``dev`` extras). Its skin is recoloured to a chosen Monk Skin Tone, and
each frame modulates the skin along the blood-volume-pulse direction of
de Haan & van Leest (2014), so the pulse signal a camera would see is reproduced with
a known ground truth: beat times (with heart-rate variability), respiratory rate,
head motion, illumination drift and flicker, sensor noise and 8-bit quantisation.

References:
    G. de Haan, A. van Leest, "Improved motion robustness of remote-PPG by using the
    blood volume pulse signature", Physiol. Meas. 35 (2014) 1913.
    E. Monk, "Monk Skin Tone Scale" (Google, 2019-2023), CC-BY-4.0.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

FRAME_SIZE: Final = (640, 480)  # width, height in pixels
# Relative pulsatile strength in R, G, B for skin (de Haan & van Leest 2014, Table 1,
# "normalised PBV signature" under a halogen-like illuminant).
PBV_SIGNATURE: Final = np.array([0.33, 0.77, 0.53], dtype=np.float32)
# Monk Skin Tone scale, sRGB (R, G, B), tones 1..10.
MONK_SKIN_TONES: Final[dict[int, tuple[int, int, int]]] = {
    1: (0xF6, 0xED, 0xE4),
    2: (0xF3, 0xE7, 0xDB),
    3: (0xF7, 0xEA, 0xD0),
    4: (0xEA, 0xDA, 0xBA),
    5: (0xD7, 0xBD, 0x96),
    6: (0xA0, 0x7E, 0x56),
    7: (0x82, 0x5C, 0x43),
    8: (0x60, 0x41, 0x34),
    9: (0x3A, 0x31, 0x2A),
    10: (0x29, 0x24, 0x20),
}
# Crop of the 512x512 astronaut photo giving a 4:3 portrait (rows, columns).
_ASTRONAUT_CROP: Final = (slice(0, 288), slice(33, 417))
# Face and neck of the photo, in crop coordinates (pixels): an ellipse (centre,
# semi-axes) and a neck rectangle (x0, y0, x1, y1).
_FACE_ELLIPSE: Final = ((192, 128), (52, 62))
_NECK_RECT: Final = (165, 150, 225, 205)
_CHIN_ROW: Final = 165  # below it the neck is shaded and less red than the face
# YCrCb thresholds for this photo: the face's skin has Cr >= 143, the blond hair
# Cr 140-142; the shaded neck needs a lower bound (Chai & Ngan 1999 style).
_SKIN_YCRCB_LOW: Final = (30, 143, 85)
_NECK_YCRCB_LOW: Final = (30, 134, 85)
_SKIN_YCRCB_HIGH: Final = (255, 175, 130)
_SKIN_CLOSE_PIXELS: Final = 9
_SKIN_EDGE_BLUR_PIXELS: Final = 7
# Pulse waveform: systolic Gaussian at the beat time plus a diastolic wave, with
# widths and delay as fractions of the inter-beat interval (typical finger PPG shape).
_SYSTOLIC_WIDTH_FRACTION: Final = 0.10
_DIASTOLIC_DELAY_FRACTION: Final = 0.32
_DIASTOLIC_WIDTH_FRACTION: Final = 0.12
_DIASTOLIC_RELATIVE_HEIGHT: Final = 0.4
_MIN_TRUTH_BEATS: Final = 4  # fewer beats give no meaningful HR / HRV truth
_NOISE_BANK_FRAMES: Final = 24  # drawn at random per frame, so not periodic
_LF_HRV_HZ: Final = 0.1  # Mayer-wave (baroreflex) rhythm of heart rate, 0.1 Hz


@dataclass(frozen=True, slots=True)
class SceneConfig:
    """Parameters of one synthetic scan; all amplitudes are relative (fractions)."""

    duration_s: float = 30.0
    fps: float = 30.0
    heart_rate_bpm: float = 72.0
    rsa_fraction: float = 0.04  # peak IBI change from respiratory sinus arrhythmia
    lf_fraction: float = 0.03  # peak IBI change at 0.1 Hz
    ibi_jitter_s: float = 0.015  # white beat-to-beat IBI noise, standard deviation
    respiratory_rate_bpm: float = 15.0
    skin_tone: int = 4  # Monk scale 1..10
    pulse_amplitude: float = 0.006  # peak relative skin change along PBV
    resp_baseline_amplitude: float = 0.003  # respiratory blood-volume baseline swing
    resp_amplitude_modulation: float = 0.15  # pulse amplitude change with breathing
    head_motion_pixels: float = 0.0  # peak head sway, pixels
    breathing_motion_pixels: float = 0.5  # vertical head movement with breathing
    illumination_drift: float = 0.0  # total relative gain change over the scan
    flicker_amplitude: float = 0.0  # relative gain of the light flicker
    flicker_hz: float = 10.0  # apparent (aliased) flicker frequency at the camera
    noise_sigma_dn: float = 2.0  # sensor noise, standard deviation in 8-bit counts
    face: bool = True  # False: background only (negative case)
    pulse: bool = True  # False: a face with no pulse (photo, mask; negative case)
    seed: int = 0


@dataclass(frozen=True)
class SceneTruth:
    """Ground truth of a synthetic scan."""

    beat_times_s: NDArray[np.float64]  # (M,), seconds from the first frame
    heart_rate_bpm: float | None  # 60 / mean IBI, None when there is no pulse
    sdnn_ms: float | None
    rmssd_ms: float | None
    respiratory_rate_bpm: float | None
    extras: dict[str, float] = field(default_factory=dict)


@functools.cache
def _astronaut_bgr() -> NDArray[np.uint8]:
    """Return the cropped astronaut portrait as BGR uint8 (H, W, 3)."""
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "synthetic faces need scikit-image: pip install 'kiosk-vitals[demo]'"
        ) from exc
    rgb = data.astronaut()[_ASTRONAUT_CROP]  # type: ignore[no-untyped-call]
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    resized = cv2.resize(bgr, FRAME_SIZE, interpolation=cv2.INTER_CUBIC)
    return np.asarray(resized, dtype=np.uint8)


@functools.cache
def _skin_mask() -> NDArray[np.float32]:
    """Return a soft skin mask (H, W) in [0, 1] for the resized portrait."""
    bgr = _astronaut_bgr()
    scale = FRAME_SIZE[0] / (_ASTRONAUT_CROP[1].stop - _ASTRONAUT_CROP[1].start)
    face = np.zeros(bgr.shape[:2], np.uint8)
    (cx, cy), (ax, ay) = _FACE_ELLIPSE
    centre = (round(cx * scale), round(cy * scale))
    axes = (round(ax * scale), round(ay * scale))
    cv2.ellipse(face, centre, axes, 0, 0, 360, 255, -1)
    neck = np.zeros_like(face)
    x0, y0, x1, y1 = (round(v * scale) for v in _NECK_RECT)
    neck[y0:y1, x0:x1] = 255
    neck[: round(_CHIN_ROW * scale)] = 0
    ycc = cv2.cvtColor(bgr, cv2.COLOR_BGR2YCrCb)
    skin = cv2.bitwise_or(
        cv2.bitwise_and(face, cv2.inRange(ycc, _SKIN_YCRCB_LOW, _SKIN_YCRCB_HIGH)),
        cv2.bitwise_and(neck, cv2.inRange(ycc, _NECK_YCRCB_LOW, _SKIN_YCRCB_HIGH)),
    )
    kernel = np.ones((_SKIN_CLOSE_PIXELS, _SKIN_CLOSE_PIXELS), np.uint8)
    skin = cv2.morphologyEx(skin, cv2.MORPH_CLOSE, kernel)
    mask = skin.astype(np.float32) / 255.0
    k = _SKIN_EDGE_BLUR_PIXELS
    return np.asarray(cv2.GaussianBlur(mask, (k, k), 0), dtype=np.float32)


@functools.cache
def face_image(skin_tone: int) -> NDArray[np.float32]:
    """Return the portrait (H, W, 3) BGR float32 with skin recoloured to a Monk tone."""
    bgr = _astronaut_bgr().astype(np.float32)
    mask = _skin_mask()[..., None]
    luma = cv2.cvtColor(_astronaut_bgr(), cv2.COLOR_BGR2GRAY).astype(np.float32)
    skin_luma = float(np.sum(luma * mask[..., 0]) / np.sum(mask))
    shading = (luma / skin_luma)[..., None]
    r, g, b = MONK_SKIN_TONES[skin_tone]
    tone = np.array([b, g, r], dtype=np.float32)
    recoloured = np.clip(tone * shading, 0.0, 255.0)
    return (bgr * (1.0 - mask) + recoloured * mask).astype(np.float32)


def background_image() -> NDArray[np.float32]:
    """Return the portrait's backdrop with no face: a blurred wall, BGR float32."""
    bgr = _astronaut_bgr()
    wall = cv2.resize(bgr[:, :60], FRAME_SIZE, interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(wall, (0, 0), 25).astype(np.float32)


def beat_times(config: SceneConfig, rng: np.random.Generator) -> NDArray[np.float64]:
    """Return beat times (M,) in seconds covering the scan, with RSA and LF HRV."""
    mean_ibi = 60.0 / config.heart_rate_bpm
    resp_hz = config.respiratory_rate_bpm / 60.0
    resp_phase, lf_phase = rng.uniform(0.0, 2 * np.pi, 2)
    t = -rng.uniform(0.0, mean_ibi)  # first beat before the first frame
    times = []
    while t < config.duration_s + 2 * mean_ibi:
        times.append(t)
        ibi = mean_ibi * (
            1.0
            + config.rsa_fraction * np.sin(2 * np.pi * resp_hz * t + resp_phase)
            + config.lf_fraction * np.sin(2 * np.pi * _LF_HRV_HZ * t + lf_phase)
        ) + rng.normal(0.0, config.ibi_jitter_s)
        t += ibi
    return np.asarray(times)


def pulse_waveform(
    t_s: NDArray[np.float64], beats_s: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Return a blood-volume waveform (N,) at times t_s, peaking at each beat time."""
    ibi = np.diff(beats_s, append=beats_s[-1] + (beats_s[-1] - beats_s[-2]))
    dt = t_s[:, None] - beats_s[None, :]
    systolic = np.exp(-0.5 * (dt / (_SYSTOLIC_WIDTH_FRACTION * ibi)) ** 2)
    diastolic = _DIASTOLIC_RELATIVE_HEIGHT * np.exp(
        -0.5
        * ((dt - _DIASTOLIC_DELAY_FRACTION * ibi) / (_DIASTOLIC_WIDTH_FRACTION * ibi))
        ** 2
    )
    wave = np.asarray(np.sum(systolic + diastolic, axis=1), dtype=np.float64)
    return np.asarray(wave - wave.mean(), dtype=np.float64)


def _ibi_truth(
    beats_s: NDArray[np.float64], duration_s: float
) -> tuple[float, float, float]:
    """Return (HR bpm, SDNN ms, RMSSD ms) of the beats inside [0, duration_s]."""
    inside = beats_s[(beats_s >= 0.0) & (beats_s <= duration_s)]
    ibi = np.diff(inside)
    hr = 60.0 / float(np.mean(ibi))
    sdnn = 1000.0 * float(np.std(ibi, ddof=1))
    rmssd = 1000.0 * float(np.sqrt(np.mean(np.diff(ibi) ** 2)))
    return hr, sdnn, rmssd


class SyntheticScene:
    """Render the frames of one synthetic scan; deterministic for a given seed."""

    def __init__(self, config: SceneConfig) -> None:
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.n_frames = round(config.duration_s * config.fps)
        self.times_s = np.arange(self.n_frames) / config.fps
        t = self.times_s

        # Physiology: beats, pulse waveform, respiration.
        beats = beat_times(config, rng)
        resp_hz = config.respiratory_rate_bpm / 60.0
        resp = np.sin(2 * np.pi * resp_hz * t + rng.uniform(0, 2 * np.pi))
        wave = pulse_waveform(t, beats)
        wave /= np.max(np.abs(wave))
        pulse = (
            config.pulse_amplitude
            * wave
            * (1.0 + config.resp_amplitude_modulation * resp)
            + config.resp_baseline_amplitude * resp
        )
        self._blood = pulse if (config.pulse and config.face) else np.zeros_like(t)

        # Scene: illumination gain and head motion.
        drift = 1.0 + config.illumination_drift * (t / config.duration_s - 0.5)
        flicker = config.flicker_amplitude * np.sin(
            2 * np.pi * config.flicker_hz * t + rng.uniform(0, 2 * np.pi)
        )
        self._gain = drift * (1.0 + flicker)
        sway_hz = rng.uniform(0.1, 0.4, 2)
        sway_phase = rng.uniform(0, 2 * np.pi, 2)
        amp = config.head_motion_pixels
        self._dx = amp * np.sin(2 * np.pi * sway_hz[0] * t + sway_phase[0])
        self._dy = amp * np.sin(2 * np.pi * sway_hz[1] * t + sway_phase[1]) + (
            config.breathing_motion_pixels * resp
        )

        # Images: base, pulsatile modulation map and a bank of sensor noise.
        if config.face:
            self._base = face_image(config.skin_tone)
            self._modulation = (
                self._base * _skin_mask()[..., None] * PBV_SIGNATURE[::-1]
            )
        else:
            self._base = background_image()
            self._modulation = np.zeros_like(self._base)
        shape = (_NOISE_BANK_FRAMES, *self._base.shape)
        self._noise = rng.standard_normal(shape, dtype=np.float32)
        self._noise *= np.float32(config.noise_sigma_dn)
        self._noise_order = rng.integers(0, _NOISE_BANK_FRAMES, self.n_frames)

        # Ground truth.
        inside = (beats >= 0.0) & (beats <= config.duration_s)
        if config.face and config.pulse and inside.sum() >= _MIN_TRUTH_BEATS:
            hr, sdnn, rmssd = _ibi_truth(beats, config.duration_s)
            self.truth = SceneTruth(beats, hr, sdnn, rmssd, config.respiratory_rate_bpm)
        else:
            self.truth = SceneTruth(np.empty(0), None, None, None, None)

    def frame(self, index: int) -> NDArray[np.uint8]:
        """Return frame `index` as BGR uint8 (480, 640, 3)."""
        # Blood volume absorbs light: more blood, darker skin along the PBV direction.
        img = self._base - float(self._blood[index]) * self._modulation
        img *= float(self._gain[index])
        dx, dy = float(self._dx[index]), float(self._dy[index])
        if dx or dy:
            shift = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]], dtype=np.float32)
            img = cv2.warpAffine(
                img, shift, FRAME_SIZE, flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            )  # fmt: skip
        img += self._noise[self._noise_order[index]]
        return np.clip(img, 0.0, 255.0).astype(np.uint8)

    def frames(self) -> list[NDArray[np.uint8]]:
        """Render every frame (list of BGR uint8 (480, 640, 3))."""
        return [self.frame(i) for i in range(self.n_frames)]


def write_video(scene: SyntheticScene, path: str, fourcc: str = "MJPG") -> None:
    """Write the scene to a video file with an OpenCV codec (MJPG, XVID, ...)."""
    writer = cv2.VideoWriter(
        path, cv2.VideoWriter.fourcc(*fourcc), scene.config.fps, FRAME_SIZE
    )
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {fourcc} to {path}")
    try:
        for i in range(scene.n_frames):
            writer.write(scene.frame(i))
    finally:
        writer.release()
