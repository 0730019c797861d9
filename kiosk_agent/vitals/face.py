"""Face detection, tracking and skin regions of interest.

Detection runs every few frames on a half-resolution grey image with OpenCV's Haar
cascade (Viola & Jones 2001). Haar cascades are known to miss dark skin, whose faces
have low grey-level contrast; when the plain detector finds nothing, the same frame is
retried after contrast-limited adaptive histogram equalisation (CLAHE, Zuiderveld 1994),
and the path that found the face is counted (see ``FaceTracker.stats``).

Between detections the face is tracked by normalised cross-correlation of a
quarter-resolution template (sub-pixel peak), which is cheap and keeps the skin regions
still: a new detection replaces the tracked box only when the two disagree, so the
regions do not jump by the detector's scale steps.

The skin signal is the pixel-weighted mean of three fixed regions of the face box
(forehead and both cheeks; the regions of Li et al. 2014 and Wang et al. 2017),
computed with ``cv2.mean``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

HAAR_CASCADE_FILE: Final = "haarcascade_frontalface_default.xml"
DETECT_EVERY_FRAMES: Final = 10
DETECT_SCALE: Final = 0.5  # detection image: half resolution (320x240 for VGA)
TRACK_SCALE: Final = 0.25  # tracking image: quarter resolution
HAAR_SCALE_FACTOR: Final = 1.1
HAAR_MIN_NEIGHBOURS: Final = 5
CLAHE_MIN_NEIGHBOURS: Final = 4
MIN_FACE_HEIGHT_FRACTION: Final = 0.15  # smallest face, fraction of frame height
CLAHE_CLIP_LIMIT: Final = 3.0
CLAHE_TILES: Final = (4, 4)
# Tracking: template is the central part of the face box; search margin per side.
TEMPLATE_INSET_FRACTION: Final = 0.15
SEARCH_MARGIN_FRACTION: Final = 0.25
MIN_TRACK_SCORE: Final = 0.6  # normalised cross-correlation below it: face lost
# A detection replaces the tracked box when its centre moved more than this fraction
# of the face width, or its width changed by more than this ratio.
RESEAT_SHIFT_FRACTION: Final = 0.15
RESEAT_SIZE_RATIO: Final = 0.2
# Motion: face centre moving faster than this fraction of face width per second.
MOTION_WIDTH_FRACTION_PER_S: Final = 0.6
NOMINAL_FPS: Final = 30.0
# Skin regions as fractions (x0, y0, x1, y1) of the face box.
SKIN_REGIONS: Final = (
    (0.30, 0.16, 0.70, 0.30),  # forehead
    (0.15, 0.52, 0.37, 0.74),  # left cheek
    (0.63, 0.52, 0.85, 0.74),  # right cheek
)


class FaceDetectorError(RuntimeError):
    """The face detector cannot be created (missing cascade file)."""


@dataclass(frozen=True, slots=True)
class Box:
    """A face box in full-resolution pixels (float for sub-pixel tracking)."""

    x: float
    y: float
    w: float
    h: float

    @property
    def centre(self) -> tuple[float, float]:
        """Return the box centre (x, y) in pixels."""
        return self.x + self.w / 2, self.y + self.h / 2


@dataclass(frozen=True, slots=True)
class FaceObservation:
    """One frame's face result: box, skin mean colour and motion flag."""

    box: Box | None
    rgb: tuple[float, float, float] | None  # mean skin R, G, B (0..255)
    motion: bool


@dataclass(slots=True)
class DetectorStats:
    """Counts of detection attempts and which path found the face."""

    attempts: int = 0
    plain: int = 0
    clahe: int = 0
    missed: int = 0


class FaceTracker:
    """Detect, track and sample the skin of the largest face in a BGR video."""

    def __init__(
        self,
        detect_every: int = DETECT_EVERY_FRAMES,
        clahe_fallback: bool = True,
    ) -> None:
        path = cv2.data.haarcascades + HAAR_CASCADE_FILE  # type: ignore[attr-defined]
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise FaceDetectorError(f"cannot load Haar cascade {path}")
        self._clahe = cv2.createCLAHE(CLAHE_CLIP_LIMIT, CLAHE_TILES)
        self._detect_every = detect_every
        self._clahe_fallback = clahe_fallback
        self.stats = DetectorStats()
        self.reset()

    def reset(self) -> None:
        """Forget the tracked face."""
        self._box: Box | None = None
        self._template: NDArray[np.uint8] | None = None
        self._anchor: Box | None = None  # the box where the template was cut
        self._since_detect = self._detect_every  # detect on the next frame
        self._prev_centre: tuple[float, float] | None = None

    def update(self, frame_bgr: NDArray[np.uint8], dt_s: float) -> FaceObservation:
        """Process one BGR frame (H, W, 3) uint8; dt_s is the time since the last."""
        small = cv2.resize(
            frame_bgr, None, fx=TRACK_SCALE, fy=TRACK_SCALE,
            interpolation=cv2.INTER_AREA,
        )  # fmt: skip
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)

        # Track, then detect every few frames (or at once when the face is lost).
        if self._box is not None:
            self._box = self._track(grey)
        self._since_detect += 1
        if self._box is None or self._since_detect >= self._detect_every:
            self._since_detect = 0
            detected = self._detect(frame_bgr)
            if detected is not None and self._should_reseat(detected):
                self._box = self._anchor = detected
                self._template = self._cut_template(grey, detected)

        # Motion and skin colour.
        if self._box is None:
            self._prev_centre = None
            return FaceObservation(None, None, motion=False)
        motion = self._moved(self._box, dt_s)
        return FaceObservation(self._box, skin_rgb(frame_bgr, self._box), motion)

    def _detect(self, frame_bgr: NDArray[np.uint8]) -> Box | None:
        """Run the Haar cascade at half resolution, with the CLAHE fallback."""
        half = cv2.resize(
            frame_bgr, None, fx=DETECT_SCALE, fy=DETECT_SCALE,
            interpolation=cv2.INTER_AREA,
        )  # fmt: skip
        grey = cv2.cvtColor(half, cv2.COLOR_BGR2GRAY)
        min_side = max(1, round(MIN_FACE_HEIGHT_FRACTION * grey.shape[0]))
        self.stats.attempts += 1
        faces = self._cascade.detectMultiScale(
            grey, HAAR_SCALE_FACTOR, HAAR_MIN_NEIGHBOURS, minSize=(min_side, min_side)
        )
        if len(faces):
            self.stats.plain += 1
        elif self._clahe_fallback:
            faces = self._cascade.detectMultiScale(
                self._clahe.apply(grey), HAAR_SCALE_FACTOR, CLAHE_MIN_NEIGHBOURS,
                minSize=(min_side, min_side),
            )  # fmt: skip
            if len(faces):
                self.stats.clahe += 1
        if not len(faces):
            self.stats.missed += 1
            return None
        x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
        s = 1.0 / DETECT_SCALE
        return Box(float(x * s), float(y * s), float(w * s), float(h * s))

    def _should_reseat(self, detected: Box) -> bool:
        """Return True when a detection disagrees enough with the tracked box."""
        if self._box is None:
            return True
        (cx, cy), (dx, dy) = self._box.centre, detected.centre
        shift = np.hypot(cx - dx, cy - dy) / self._box.w
        size = abs(detected.w / self._box.w - 1.0)
        return bool(shift > RESEAT_SHIFT_FRACTION or size > RESEAT_SIZE_RATIO)

    def _cut_template(self, grey: NDArray[np.uint8], box: Box) -> NDArray[np.uint8]:
        """Cut the central face patch from the quarter-resolution grey image."""
        x0, y0, x1, y1 = _inset(box, TEMPLATE_INSET_FRACTION, TRACK_SCALE)
        return grey[y0:y1, x0:x1].copy()

    def _track(self, grey: NDArray[np.uint8]) -> Box | None:
        """Move the box to the best template match near it; None when lost."""
        box, tpl, anchor = self._box, self._template, self._anchor
        if box is None or tpl is None or anchor is None or tpl.size == 0:
            return None
        cx0, cy0, _, _ = _inset(box, TEMPLATE_INSET_FRACTION, TRACK_SCALE)
        margin = max(2, round(SEARCH_MARGIN_FRACTION * box.w * TRACK_SCALE))
        sx0, sy0 = max(0, cx0 - margin), max(0, cy0 - margin)
        sx1 = min(grey.shape[1], cx0 + tpl.shape[1] + margin)
        sy1 = min(grey.shape[0], cy0 + tpl.shape[0] + margin)
        search = grey[sy0:sy1, sx0:sx1]
        if search.shape[0] < tpl.shape[0] or search.shape[1] < tpl.shape[1]:
            return None
        scores = cv2.matchTemplate(search, tpl, cv2.TM_CCOEFF_NORMED)
        _, best, _, (bx, by) = cv2.minMaxLoc(scores)
        if best < MIN_TRACK_SCORE:
            logger.debug("face lost (match score %.2f)", best)
            return None

        # The template is the one cut at detection: measure the shift from there,
        # so tracking errors do not accumulate.
        ax0, ay0, _, _ = _inset(anchor, TEMPLATE_INSET_FRACTION, TRACK_SCALE)
        fx = sx0 + bx + _subpixel(scores[by, :], bx)
        fy = sy0 + by + _subpixel(scores[:, bx], by)
        return Box(
            anchor.x + (fx - ax0) / TRACK_SCALE,
            anchor.y + (fy - ay0) / TRACK_SCALE,
            anchor.w,
            anchor.h,
        )

    def _moved(self, box: Box, dt_s: float) -> bool:
        """Return True when the face centre moves faster than the motion limit."""
        centre = box.centre
        prev, self._prev_centre = self._prev_centre, centre
        if prev is None:
            return False
        dt = dt_s if dt_s > 0 else 1.0 / NOMINAL_FPS
        speed = np.hypot(centre[0] - prev[0], centre[1] - prev[1]) / dt
        return bool(speed > MOTION_WIDTH_FRACTION_PER_S * box.w)


def _inset(box: Box, inset: float, scale: float) -> tuple[int, int, int, int]:
    """Return the inset box (x0, y0, x1, y1) as integers at the given scale."""
    x0 = round((box.x + inset * box.w) * scale)
    y0 = round((box.y + inset * box.h) * scale)
    x1 = round((box.x + (1 - inset) * box.w) * scale)
    y1 = round((box.y + (1 - inset) * box.h) * scale)
    return max(0, x0), max(0, y0), max(0, x1), max(0, y1)


def _subpixel(row: NDArray[np.float32], i: int) -> float:
    """Return the parabolic sub-sample offset of the peak at index i of a 1-D array."""
    if i <= 0 or i >= len(row) - 1:
        return 0.0
    a, b, c = float(row[i - 1]), float(row[i]), float(row[i + 1])
    denom = a - 2 * b + c
    return 0.0 if denom == 0 else 0.5 * (a - c) / denom


def skin_rgb(
    frame_bgr: NDArray[np.uint8], box: Box
) -> tuple[float, float, float] | None:
    """Return the pixel-weighted mean (R, G, B) of the skin regions of a face box."""
    height, width = frame_bgr.shape[:2]
    total = np.zeros(3)
    pixels = 0
    for fx0, fy0, fx1, fy1 in SKIN_REGIONS:
        x0 = min(max(round(box.x + fx0 * box.w), 0), width)
        x1 = min(max(round(box.x + fx1 * box.w), 0), width)
        y0 = min(max(round(box.y + fy0 * box.h), 0), height)
        y1 = min(max(round(box.y + fy1 * box.h), 0), height)
        n = (x1 - x0) * (y1 - y0)
        if n <= 0:
            continue
        b, g, r, _ = cv2.mean(frame_bgr[y0:y1, x0:x1])
        total += n * np.array((r, g, b))
        pixels += n
    if pixels == 0:
        return None
    r, g, b = total / pixels
    return float(r), float(g), float(b)
