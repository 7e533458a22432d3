"""Video lines: decode with PyAV and sample frames uniformly, one 448px tile per frame.

InternVL's video loader (``read_frames_decord`` in ``internvl_chat/internvl/train/dataset.py``)
draws a random frame count in [min, max] and a random frame inside each of that many equal
segments during training. We sample deterministically, the middle frame of each segment
(InternVL's ``sample="middle"``), with ``clamp(total_frames, min_frames, max_frames)`` segments:
the same line then always gives the same pixels, which a cached reference log-prob needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mpo.data.mmpr import DataError


class VideoError(DataError):
    """A video that cannot be read; ``reason`` is the skip category."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def frame_indices(total: int, num: int) -> list[int]:
    """Middle frame of each of ``num`` equal segments of ``range(total)`` (repeats if total < num)."""
    edges = np.linspace(0, total, num + 1)
    return [min(total - 1, int((edges[k] + edges[k + 1]) / 2)) for k in range(num)]


def num_frames_to_sample(total: int, min_frames: int, max_frames: int) -> int:
    return int(min(max_frames, max(min_frames, total)))


def _decode(path: Path, wanted: set[int] | None) -> tuple[int, dict[int, Image.Image]]:
    """Decode every frame once; keep only ``wanted`` indices (None: keep none, just count)."""
    import av

    kept: dict[int, Image.Image] = {}
    count = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream", "corrupt_video")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if wanted is not None and count in wanted:
                kept[count] = frame.to_image().convert("RGB")
            count += 1
    return count, kept


def video_frames(path: Path, data_cfg, where: str) -> list[Image.Image]:
    """Uniformly sampled RGB frames of the video at ``path``.

    Args:
        path: the video file (already resolved against the dataset root).
        data_cfg: ``DataConfig``; uses ``video_min_frames`` and ``video_max_frames``.
        where: ``file:line`` of the annotation, for error messages.

    Raises:
        VideoError: file missing (reason ``missing_video``), undecodable or without frames
            (``corrupt_video``); the message names the annotation line and the field.
        DataError: PyAV is not installed (an environment problem: never a counted skip).
    """
    try:
        import av  # noqa: F401  (_decode imports it again where it is used)
    except ImportError as exc:
        err = DataError(
            f"{where}: field 'video': reading videos needs PyAV, which is not installed (pip install av)"
        )
        err.fatal = True  # the same for every video line: stop, whatever data.on_bad_sample says
        raise err from exc

    if not Path(path).is_file():
        raise VideoError(f"{where}: field 'video': video not found: {path}", "missing_video")
    try:
        # The container's frame count is often missing or wrong, so count by decoding (pass 1),
        # then decode again keeping only the sampled frames (pass 2): memory stays at N frames.
        with av.open(str(path)) as container:
            total = int(container.streams.video[0].frames or 0)
        if total <= 0:
            total, _ = _decode(path, None)
        if total <= 0:
            raise VideoError(f"{where}: field 'video': {path} has no frames", "corrupt_video")
        idx = frame_indices(
            total, num_frames_to_sample(total, data_cfg.video_min_frames, data_cfg.video_max_frames)
        )
        decoded, kept = _decode(path, set(idx))
    except (av.error.FFmpegError, IndexError) as exc:
        raise VideoError(
            f"{where}: field 'video': cannot decode video {path}: {exc}", "corrupt_video"
        ) from exc
    missing = [k for k in idx if k not in kept]
    if missing:  # the header promised more frames than the stream holds
        if decoded <= 0:
            raise VideoError(f"{where}: field 'video': {path} has no frames", "corrupt_video")
        idx = frame_indices(
            decoded, num_frames_to_sample(decoded, data_cfg.video_min_frames, data_cfg.video_max_frames)
        )
        _, kept = _decode(path, set(idx))
    return [kept[k] for k in idx]
