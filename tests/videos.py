"""Clips the tests encode themselves with PyAV: frame k carries its number k as a stripe pattern.

Each frame is ``BITS`` vertical stripes of 8 px, stripe i white when bit i of k is set; lossy codecs
(H.264, MPEG-4 Part 2, MJPEG) keep stripes this wide far from the 128 threshold, so
``frame_number`` reads back which source frame a decoded one is.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

BITS = 10  # frame numbers up to 1023
STRIPE = 8
WIDTH, HEIGHT = BITS * STRIPE, 48

# (codec, container suffix, pixel format): encoders in PyAV's bundled FFmpeg.
CODECS = {
    "h264": ("libx264", ".mp4", "yuv420p"),
    "mpeg4": ("mpeg4", ".avi", "yuv420p"),
    "mjpeg": ("mjpeg", ".avi", "yuvj420p"),
    "ffv1": ("ffv1", ".mkv", "yuv444p"),
}


def frame_pattern(k: int) -> np.ndarray:
    """``(HEIGHT, WIDTH, 3)`` uint8: stripe i is 255 when bit i of ``k`` is set, else 0."""
    bits = (k >> np.arange(BITS)) & 1
    row = np.repeat(bits * 255, STRIPE).astype(np.uint8)
    return np.broadcast_to(row[None, :, None], (HEIGHT, WIDTH, 3)).copy()


def frame_number(image) -> int:
    """The number a decoded frame (PIL image or ``(H, W, 3)`` array) carries."""
    arr = np.asarray(image, dtype=np.float64)
    means = arr.reshape(arr.shape[0], BITS, -1, 3).mean(axis=(0, 2, 3))
    return int(sum(1 << i for i, m in enumerate(means) if m > 128))


def write_clip(
    path: Path,
    num_frames: int,
    fps: int = 30,
    codec: str = "h264",
    times_ms: list[int] | None = None,
    gop: int | None = None,
) -> Path:
    """Encode frames 0..num_frames-1 at ``fps`` (or at the given display times, variable rate).

    Returns ``path`` with the codec's container suffix.
    """
    import av

    name, suffix, pix_fmt = CODECS[codec]
    path = Path(path).with_suffix(suffix)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(name, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(k), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[k], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
