"""Frame sources: a camera, file or stream through OpenCV, and a synthetic face.

``VideoSource`` reads frames in a capture thread into a bounded buffer that keeps the
newest frames and counts the ones it dropped, so a slow consumer never blocks the
camera and never sees stale video. ``SyntheticFaceSource`` renders a face with a known
pulse and respiration (``kiosk_agent.vitals.synthetic``), in real time or as fast as
possible, for demos and tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from kiosk_agent.vitals.synthetic import SceneConfig

logger = logging.getLogger(__name__)

BUFFER_FRAMES: Final = 4  # newest frames kept; older ones are dropped and counted
READ_TIMEOUT_SECONDS: Final = 2.0
REOPEN_DELAY_SECONDS: Final = 1.0  # wait before reopening a failed stream
STOP_JOIN_SECONDS: Final = 3.0


class SourceError(RuntimeError):
    """A frame source cannot be opened or has ended."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One video frame: BGR uint8 (H, W, 3), capture time (monotonic s), index."""

    image: NDArray[np.uint8]
    timestamp_s: float
    index: int


class FrameSource(Protocol):
    """What the agent needs from a source of frames."""

    fps: float

    def start(self) -> None:
        """Start producing frames."""

    def read(self, timeout_s: float = READ_TIMEOUT_SECONDS) -> Frame | None:
        """Return the next frame, or None at the end of the source."""

    def stop(self) -> None:
        """Stop producing frames and release the device."""


def parse_device(spec: str) -> int | str:
    """Return a camera index for a decimal string, else the path or URL unchanged."""
    return int(spec) if spec.isdecimal() else spec


class VideoSource:
    """Read a camera index, file or RTSP/HTTP URL with OpenCV in a capture thread.

    Args:
        device: camera index (int or decimal string), file path or stream URL.
        buffer_frames: frames kept for the consumer; when full, the oldest is
            dropped and counted in ``dropped``.
        realtime_file: for files, pace reading at the file's frame rate (as a camera
            would); otherwise read files as fast as the consumer takes them, without
            dropping.
    """

    def __init__(
        self,
        device: int | str,
        buffer_frames: int = BUFFER_FRAMES,
        realtime_file: bool = False,
    ) -> None:
        self.device = parse_device(device) if isinstance(device, str) else device
        self._buffer: deque[Frame] = deque(maxlen=buffer_frames)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ended = False
        self._capture: cv2.VideoCapture | None = None
        self._is_file = isinstance(self.device, str) and "://" not in self.device
        self._realtime_file = realtime_file
        self.fps = 0.0
        self.captured = 0
        self.dropped = 0

    def start(self) -> None:
        """Open the device and start the capture thread."""
        self._capture = self._open()
        self._thread = threading.Thread(
            target=self._run, name=f"capture[{self.device}]", daemon=True
        )
        self._thread.start()
        logger.info("video source %s started at %.1f fps", self.device, self.fps)

    def _open(self) -> cv2.VideoCapture:
        """Open the capture device; raise SourceError when it cannot be opened."""
        try:
            capture = cv2.VideoCapture(self.device)
        except cv2.error as exc:
            raise SourceError(f"cannot open video source {self.device!r}") from exc
        if not capture.isOpened():
            raise SourceError(f"cannot open video source {self.device!r}")
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if fps > 0 else 30.0
        return capture

    def _run(self) -> None:
        """Capture loop: read frames, keep the newest, count drops."""
        capture = self._capture
        assert capture is not None
        period = 1.0 / self.fps
        next_due = time.monotonic()
        try:
            while not self._stopping.is_set():
                ok, image = capture.read()
                if not ok or image is None:
                    if self._is_file:
                        break
                    logger.warning("video source %s: read failed, reopening",
                                   self.device)  # fmt: skip
                    capture.release()
                    if self._stopping.wait(REOPEN_DELAY_SECONDS):
                        break
                    capture = cv2.VideoCapture(self.device)
                    continue
                frame = Frame(np.asarray(image, np.uint8), time.monotonic(),
                              self.captured)  # fmt: skip
                self._put(frame)
                if self._is_file and self._realtime_file:
                    next_due += period
                    self._stopping.wait(max(0.0, next_due - time.monotonic()))
        finally:
            capture.release()
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _put(self, frame: Frame) -> None:
        """Add a frame; drop the oldest when full (or wait, for files read fast)."""
        with self._cond:
            if self._is_file and not self._realtime_file:
                while (
                    len(self._buffer) == self._buffer.maxlen
                    and not self._stopping.is_set()
                ):
                    self._cond.wait(READ_TIMEOUT_SECONDS)
            elif len(self._buffer) == self._buffer.maxlen:
                self.dropped += 1
                logger.debug("frame dropped (consumer too slow)")
            self._buffer.append(frame)
            self.captured += 1
            self._cond.notify_all()

    def read(self, timeout_s: float = READ_TIMEOUT_SECONDS) -> Frame | None:
        """Return the oldest buffered frame; None at the end or on timeout."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._buffer or self._ended, timeout=timeout_s
            ):
                return None
            if not self._buffer:
                return None
            frame = self._buffer.popleft()
            self._cond.notify_all()
            return frame

    def stop(self) -> None:
        """Stop the capture thread and release the device."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_SECONDS)
            self._thread = None
        logger.info("video source %s stopped (%d captured, %d dropped)",
                    self.device, self.captured, self.dropped)  # fmt: skip


class SyntheticFaceSource:
    """Render a synthetic face with a known pulse and respiration.

    Args:
        config: scene parameters; its ground truth is ``self.truth``.
        realtime: pace frames at config.fps (like a camera); False renders as fast
            as they are read.
        loop: start over at the end instead of ending (for endless demos).
    """

    def __init__(
        self,
        config: SceneConfig | None = None,
        realtime: bool = True,
        loop: bool = False,
    ) -> None:
        # Imported here: rendering needs scikit-image, an optional dependency.
        from kiosk_agent.vitals import synthetic

        cfg = config or synthetic.SceneConfig()
        self.scene = synthetic.SyntheticScene(cfg)
        self.truth = self.scene.truth
        self.fps = cfg.fps
        self.realtime = realtime
        self.loop = loop
        self._index = 0
        self._t0 = 0.0
        self._running = False

    def start(self) -> None:
        """Start the clock."""
        self._t0 = time.monotonic()
        self._index = 0
        self._running = True

    def read(self, timeout_s: float = READ_TIMEOUT_SECONDS) -> Frame | None:
        """Return the next frame (waiting for its time when realtime), or None."""
        del timeout_s  # rendering never waits on a device
        if not self._running:
            return None
        n = self.scene.n_frames
        if self._index >= n and not self.loop:
            return None
        due = self._t0 + self._index / self.fps
        if self.realtime:
            time.sleep(max(0.0, due - time.monotonic()))
        image = self.scene.frame(self._index % n)
        frame = Frame(image, due if self.realtime else self._index / self.fps,
                      self._index)  # fmt: skip
        self._index += 1
        return frame

    def stop(self) -> None:
        """Stop producing frames."""
        self._running = False
