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
DETECT_EVERY_FRAMES: Final = 15  # re-detect (confirm the face) twice a second
# Without a face, search every few frames only: a full-frame cascade costs ~30 ms on
# one core, so searching every frame would take most of a core while nobody is there.
SEARCH_EVERY_FRAMES: Final = 5  # ~6 searches per second at 30 fps
DETECT_SCALE: Final = 0.5  # detection image: half resolution (320x240 for VGA)
TRACK_SCALE: Final = 0.25  # tracking image: quarter resolution
HAAR_SCALE_FACTOR: Final = 1.1
HAAR_MIN_NEIGHBOURS: Final = 5
CLAHE_MIN_NEIGHBOURS: Final = 4
# Detections whose last-stage cascade weight is below this are dropped: textured
# backgrounds pass the stages with weights near 1, frontal faces score 2-9.
MIN_LEVEL_WEIGHT: Final = 1.5
MIN_FACE_HEIGHT_FRACTION: Final = 0.15  # smallest face, fraction of frame height
CLAHE_CLIP_LIMIT: Final = 3.0
CLAHE_TILES: Final = (4, 4)
# Tracking: template is the central part of the face box; search margin per side.
TEMPLATE_INSET_FRACTION: Final = 0.15
SEARCH_MARGIN_FRACTION: Final = 0.25
MIN_TRACK_SCORE: Final = 0.6  # normalised cross-correlation below it: face lost
# Re-detection near a tracked face: region margin per side (fraction of face width)
# and the face sizes searched (fractions of the tracked width).
REDETECT_MARGIN_FRACTION: Final = 0.5
REDETECT_SIZE_RANGE: Final = (0.7, 1.4)
# Drop a tracked face that this many detections in a row failed to confirm.
MAX_MISSED_REDETECTIONS: Final = 3
# A detection replaces the tracked box when its centre moved more than this fraction
# of the face width, or its width changed by more than this ratio.
RESEAT_SHIFT_FRACTION: Final = 0.15
RESEAT_SIZE_RATIO: Final = 0.2
# Motion: face centre moving faster than this fraction of face width per second.
MOTION_WIDTH_FRACTION_PER_S: Final = 0.6
NOMINAL_FPS: Final = 30.0
# Skin regions as fractions (x0, y0, x1, y1) of the face box.
SKIN_REGIONS: Final = (
    (0.32, 0.08, 0.68, 0.20),  # forehead, below the hairline, above the brows
    (0.16, 0.56, 0.34, 0.72),  # left cheek
    (0.66, 0.56, 0.84, 0.72),  # right cheek
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
        self._search_every = min(detect_every, SEARCH_EVERY_FRAMES)
        self._clahe_fallback = clahe_fallback
        self.stats = DetectorStats()
        self.reset()

    def reset(self) -> None:
        """Forget the tracked face."""
        self._box: Box | None = None
        self._template: NDArray[np.uint8] | None = None
        self._anchor: Box | None = None  # the box where the template was cut
        self._origin: tuple[int, int] = (0, 0)  # template's full-res top-left
        self._since_detect = self._detect_every  # detect on the next frame
        self._prev_centre: tuple[float, float] | None = None
        self._misses = 0  # consecutive detections that did not confirm the face

    def update(self, frame_bgr: NDArray[np.uint8], dt_s: float) -> FaceObservation:
        """Process one BGR frame (H, W, 3) uint8; dt_s is the time since the last."""
        # Track, then detect every few frames (or at once when the face is lost).
        if self._box is not None:
            self._box = self._track(frame_bgr)
        self._since_detect += 1
        every = self._detect_every if self._box is not None else self._search_every
        if self._since_detect >= every:
            self._since_detect = 0
            detected = self._choose(self._detect(frame_bgr, self._box))
            self._misses = 0 if detected is not None else self._misses + 1
            if self._misses >= MAX_MISSED_REDETECTIONS:
                # The tracker may be following something that is no longer a face.
                logger.debug("face not confirmed by %d detections", self._misses)
                self._box, self._misses = None, 0
            if detected is not None and self._should_reseat(detected):
                self._box = self._anchor = detected
                self._template, self._origin = _quarter_grey(
                    frame_bgr, _inset(detected, TEMPLATE_INSET_FRACTION)
                )

        # Motion and skin colour.
        if self._box is None:
            self._prev_centre = None
            return FaceObservation(None, None, motion=False)
        motion = self._moved(self._box, dt_s)
        return FaceObservation(self._box, skin_rgb(frame_bgr, self._box), motion)

    def _choose(self, faces: list[Box]) -> Box | None:
        """Pick the detection overlapping the tracked face, else the largest one.

        While a face is tracked, a detection elsewhere (another person, a false
        positive) does not take over; tracking loss lets it.
        """
        if not faces:
            return None
        if self._box is None:
            return max(faces, key=lambda b: b.w * b.h)
        best = max(faces, key=lambda b: _iou(b, self._box))  # type: ignore[arg-type]
        return best if _iou(best, self._box) > 0 else None

    def _detect(self, frame_bgr: NDArray[np.uint8], near: Box | None) -> list[Box]:
        """Run the Haar cascade at half resolution, with the CLAHE fallback.

        With a tracked face, only a region around it is searched, for face sizes
        near its own, which costs a fraction of a full-frame search.
        """
        height, width = frame_bgr.shape[:2]
        x0, y0, x1, y1 = 0, 0, width, height
        sizes = None
        if near is not None:
            m = REDETECT_MARGIN_FRACTION * near.w
            x0, y0 = max(0, round(near.x - m)), max(0, round(near.y - m))
            x1 = min(width, round(near.x + near.w + m))
            y1 = min(height, round(near.y + near.h + m))
            lo, hi = REDETECT_SIZE_RANGE
            sizes = (lo * near.w * DETECT_SCALE, hi * near.w * DETECT_SCALE)
        half = cv2.resize(
            frame_bgr, None, fx=DETECT_SCALE, fy=DETECT_SCALE,
            interpolation=cv2.INTER_AREA,
        )  # fmt: skip
        grey = np.asarray(cv2.cvtColor(half, cv2.COLOR_BGR2GRAY), np.uint8)
        return self._run_cascades(grey, (x0, y0, x1, y1), sizes, height)

    def _run_cascades(
        self,
        grey: NDArray[np.uint8],
        region: tuple[int, int, int, int],
        sizes: tuple[float, float] | None,
        frame_height: int,
    ) -> list[Box]:
        """Run the plain cascade, then the CLAHE one if needed; count the outcome.

        CLAHE is applied to the whole half-resolution frame (its tiles need the
        context), and both cascades search only the region (full-res pixels).
        """
        x0, y0, x1, y1 = (round(v * DETECT_SCALE) for v in region)
        self.stats.attempts += 1
        if sizes is None:
            side = MIN_FACE_HEIGHT_FRACTION * frame_height * DETECT_SCALE
            sizes = (side, float(min(grey.shape)))
        faces = self._cascade_faces(grey[y0:y1, x0:x1], HAAR_MIN_NEIGHBOURS, sizes)
        if faces:
            self.stats.plain += 1
        elif self._clahe_fallback:
            equalised = np.asarray(self._clahe.apply(grey), np.uint8)[y0:y1, x0:x1]
            faces = self._cascade_faces(equalised, CLAHE_MIN_NEIGHBOURS, sizes)
            if faces:
                self.stats.clahe += 1
        if not faces:
            self.stats.missed += 1
        ox, oy = x0 / DETECT_SCALE, y0 / DETECT_SCALE
        return [Box(b.x + ox, b.y + oy, b.w, b.h) for b in faces]

    def _cascade_faces(
        self, grey: NDArray[np.uint8], neighbours: int, sizes: tuple[float, float]
    ) -> list[Box]:
        """Return confident detections (full-resolution units) in a half-res image."""
        lo, hi = max(1, round(sizes[0])), max(1, round(sizes[1]))
        boxes, _, weights = self._cascade.detectMultiScale3(
            grey, HAAR_SCALE_FACTOR, neighbours, minSize=(lo, lo), maxSize=(hi, hi),
            outputRejectLevels=True,
        )  # fmt: skip
        s = 1.0 / DETECT_SCALE
        return [
            Box(float(x * s), float(y * s), float(w * s), float(h * s))
            for (x, y, w, h), weight in zip(boxes, np.ravel(weights), strict=True)
            if weight >= MIN_LEVEL_WEIGHT
        ]

    def _should_reseat(self, detected: Box) -> bool:
        """Return True when a detection disagrees enough with the tracked box."""
        if self._box is None:
            return True
        (cx, cy), (dx, dy) = self._box.centre, detected.centre
        shift = np.hypot(cx - dx, cy - dy) / self._box.w
        size = abs(detected.w / self._box.w - 1.0)
        return bool(shift > RESEAT_SHIFT_FRACTION or size > RESEAT_SIZE_RATIO)

    def _track(self, frame_bgr: NDArray[np.uint8]) -> Box | None:
        """Move the box to the best template match near it; None when lost.

        Only the search region is cut and reduced to quarter resolution.
        """
        box, tpl, anchor = self._box, self._template, self._anchor
        if box is None or tpl is None or anchor is None or tpl.size == 0:
            return None
        x0, y0, x1, y1 = _inset(box, TEMPLATE_INSET_FRACTION)
        margin = SEARCH_MARGIN_FRACTION * box.w
        height, width = frame_bgr.shape[:2]
        region = (
            max(0, round(x0 - margin)),
            max(0, round(y0 - margin)),
            min(width, round(x1 + margin)),
            min(height, round(y1 + margin)),
        )
        search, (sx0, sy0) = _quarter_grey(frame_bgr, region)
        if search.shape[0] < tpl.shape[0] or search.shape[1] < tpl.shape[1]:
            return None
        scores = cv2.matchTemplate(search, tpl, cv2.TM_CCOEFF_NORMED)
        _, best, _, (bx, by) = cv2.minMaxLoc(scores)
        if best < MIN_TRACK_SCORE:
            logger.debug("face lost (match score %.2f)", best)
            return None

        # The template is the one cut at detection: measure the shift from there,
        # so tracking errors do not accumulate.
        grid = np.asarray(scores, dtype=np.float32)
        fx = sx0 + (bx + _subpixel(grid[by, :], bx)) / TRACK_SCALE
        fy = sy0 + (by + _subpixel(grid[:, bx], by)) / TRACK_SCALE
        ox, oy = self._origin
        return Box(anchor.x + fx - ox, anchor.y + fy - oy, anchor.w, anchor.h)

    def _moved(self, box: Box, dt_s: float) -> bool:
        """Return True when the face centre moves faster than the motion limit."""
        centre = box.centre
        prev, self._prev_centre = self._prev_centre, centre
        if prev is None:
            return False
        dt = dt_s if dt_s > 0 else 1.0 / NOMINAL_FPS
        speed = np.hypot(centre[0] - prev[0], centre[1] - prev[1]) / dt
        return bool(speed > MOTION_WIDTH_FRACTION_PER_S * box.w)


def _iou(a: Box, b: Box) -> float:
    """Return the intersection over union of two boxes."""
    ix = max(0.0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0.0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    return inter / (a.w * a.h + b.w * b.h - inter)


def _inset(box: Box, inset: float) -> tuple[int, int, int, int]:
    """Return the inset box (x0, y0, x1, y1) in whole full-resolution pixels."""
    return (
        max(0, round(box.x + inset * box.w)),
        max(0, round(box.y + inset * box.h)),
        max(0, round(box.x + (1 - inset) * box.w)),
        max(0, round(box.y + (1 - inset) * box.h)),
    )


def _quarter_grey(
    frame_bgr: NDArray[np.uint8], region: tuple[int, int, int, int]
) -> tuple[NDArray[np.uint8], tuple[int, int]]:
    """Return a region as quarter-resolution grey, and its full-res origin (x, y)."""
    x0, y0, x1, y1 = region
    crop = frame_bgr[y0:y1, x0:x1]
    if crop.size == 0:
        return np.zeros((0, 0), np.uint8), (x0, y0)
    small = cv2.resize(crop, None, fx=TRACK_SCALE, fy=TRACK_SCALE,
                       interpolation=cv2.INTER_AREA)  # fmt: skip
    return np.asarray(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY), np.uint8), (x0, y0)


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
    """Return the pixel-weighted mean (R, G, B) of the skin regions of a face box.

    Regions are sampled at sub-pixel positions (bilinear, ``cv2.getRectSubPix``), so a
    face moving smoothly does not make the regions jump by whole pixels, which would
    add texture changes of the size of the pulse itself.
    """
    height, width = frame_bgr.shape[:2]
    total = np.zeros(3)
    pixels = 0
    for fx0, fy0, fx1, fy1 in SKIN_REGIONS:
        w = round((fx1 - fx0) * box.w)
        h = round((fy1 - fy0) * box.h)
        cx = box.x + 0.5 * (fx0 + fx1) * box.w
        cy = box.y + 0.5 * (fy0 + fy1) * box.h
        inside = w > 0 and h > 0 and w / 2 <= cx <= width - w / 2
        if not inside or not h / 2 <= cy <= height - h / 2:
            continue
        patch = cv2.getRectSubPix(frame_bgr, (w, h), (cx, cy), patchType=cv2.CV_32F)
        b, g, r, _ = cv2.mean(patch)
        total += w * h * np.array((r, g, b))
        pixels += w * h
    if pixels == 0:
        return None
    r, g, b = total / pixels
    return float(r), float(g), float(b)
