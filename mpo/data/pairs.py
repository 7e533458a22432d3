"""One MMPR line -> one encoded preference pair (images tiled once, shared by both answers).

Follows ``LazySupervisedDataset`` in OpenGVLab/InternVL ``internvl_chat/internvl/train/
internvl_chat_mpo.py`` for what the model sees (single image with ``<image>\\n`` auto-prefix,
multi-image with a tile budget of ``max(1, max_dynamic_patch // num_images)`` per image, video
frames as one tile each, text-only pairs) but not for failures: InternVL prints the exception and
trains on a random other line instead; here a bad line raises a ``SampleError`` naming file, line
and field, or (``on_bad_sample=skip``) is counted, reported and returned as None, with
``max_bad_fraction`` as the limit.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from mpo.data.mmpr import DataError, DatasetSpec, MixedSource, read_meta
from mpo.data.template import (
    IGNORE_INDEX,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    TemplateEncoder,
    TemplateError,
    expand_image_placeholders,
    expand_video_placeholder,
)
from mpo.data.tiling import count_tiles, tile_image

logger = logging.getLogger(__name__)

SKIP_EXAMPLES_KEPT = 200  # messages kept per reason for the report (memory stays flat)


@dataclass
class VisionSpec:
    """What the model's vision side needs from the data: tile size and tokens per tile."""

    image_size: int
    tokens_per_tile: int

    @classmethod
    def from_model_config(cls, config) -> VisionSpec:
        vc = config.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        tokens = int((size // patch) ** 2 * config.downsample_ratio**2)
        return cls(image_size=int(size), tokens_per_tile=tokens)


class SampleError(DataError):
    """A sample that cannot be used; ``reason`` is a short category for skip reports.

    ``policy`` marks length skips asked for by ``data.truncation``/``max_length``: they are
    counted and reported like bad lines but are not bad data, so they neither raise under
    ``on_bad_sample=error`` nor count towards ``max_bad_fraction``.
    """

    def __init__(self, message: str, reason: str, policy: bool = False):
        super().__init__(message)
        self.reason = reason
        self.policy = policy


def _text_field(obj: dict, key: str, where: str) -> str:
    if obj.get(key) is None:  # absent (JSONL) or null-filled (Arrow)
        raise SampleError(f"{where}: missing field '{key}'", f"missing_{key}")
    value = obj[key]
    if not isinstance(value, str):
        raise SampleError(
            f"{where}: field '{key}' must be a string, got {type(value).__name__}", f"bad_{key}"
        )
    if key != "question" and not value.strip():
        raise SampleError(f"{where}: field '{key}' is empty", f"empty_{key}")
    return value


def resolve_media(root: Path, rel: Any, where: str, field: str) -> Path:
    """Join ``rel`` to ``root``, refusing paths that leave the root (``..`` or absolute).

    The check is on the normalised path, not the symlink-resolved one: a root whose ``images/``
    is a symlink to another disk is a normal set-up, while ``../../etc/x`` in a line is not.
    """
    if not isinstance(rel, str) or not rel:
        raise SampleError(
            f"{where}: field '{field}' must be a non-empty path string", f"bad_{field.split('[')[0]}"
        )
    base = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(base, rel))
    if os.path.commonpath([base, path]) != base:
        raise SampleError(
            f"{where}: field '{field}': path '{rel}' escapes the dataset root {root}", "path_escapes_root"
        )
    return Path(path)


def load_image(path: Path | bytes, where: str, field: str) -> Image.Image:
    """Decode an image file (or bytes) to RGB; SampleError naming the line and field otherwise."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise SampleError(f"{where}: field '{field}': image not found: {path}", "missing_image") from exc
    except Image.DecompressionBombError as exc:
        raise SampleError(
            f"{where}: field '{field}': image is too large to decode safely ({exc})", "image_too_large"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        shown = path if isinstance(path, Path) else "<embedded bytes>"
        raise SampleError(
            f"{where}: field '{field}': cannot decode image {shown}: {exc}", "corrupt_image"
        ) from exc


def media_entries(obj: dict, where: str) -> tuple[str, list[Any]]:
    """('image' | 'video' | 'text', the media entries) of a record; InternVL's dispatch order."""
    image, video = obj.get("image"), obj.get("video")
    has_image = image is not None and not (isinstance(image, (str, list)) and len(image) == 0)
    has_video = video is not None and video != ""
    if has_image and has_video:
        raise SampleError(
            f"{where}: fields 'image' and 'video' are both set; one kind of media per pair", "image_and_video"
        )
    if has_video:
        return "video", [video]
    if not has_image:
        return "text", []
    if isinstance(image, list):
        return "image", image
    return "image", [image]


# Structural tokens the template and the image expansion insert; never taken from the data.
RESERVED_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<|im_start|>", "<|im_end|>", "<|endoftext|>")


class PairEncoder:
    """Turns a parsed MMPR record into model inputs for the chosen and rejected answers."""

    def __init__(self, tokenizer, vision: VisionSpec, data_cfg, pixels: bool = True):
        self.template = TemplateEncoder(tokenizer, data_cfg.system_message)
        self.vision = vision
        self.cfg = data_cfg
        # pixels=False (``mpo data check``): images are fully decoded (so corrupt files are still
        # caught) and the tile count is computed, but no tiles are resized or normalised.
        self.pixels = pixels
        self.last_full_lengths: dict[str, int] = {}  # untruncated sequence lengths of the last pair
        self.truncated: Counter[str] = Counter()  # responses cut to max_length, by "chosen"/"rejected"

    def _open(self, spec: DatasetSpec, value: Any, where: str, field: str) -> Image.Image:
        if isinstance(value, dict) and value.get("bytes"):
            return load_image(value["bytes"], where, field)
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        return load_image(resolve_media(spec.root, value, where, field), where, field)

    def images(self, spec: DatasetSpec, obj: dict, where: str) -> tuple[str, torch.Tensor | None, list[int]]:
        """(kind, tiles of every image/frame or None for text-only, tiles per image/frame).

        Tiles are ``(sum of tiles, 3, S, S)`` float32; each image is decoded and tiled once.
        """
        kind, media = media_entries(obj, where)
        if kind == "text":
            return kind, None, []
        size = self.vision.image_size
        if kind == "video":
            from mpo.data.video import video_frames  # PyAV only when a video appears

            frames = video_frames(resolve_media(spec.root, media[0], where, "video"), self.cfg, where)
            if not self.pixels:
                return kind, None, [1] * len(frames)
            # InternVL's video path: each frame is one Resize((S, S)) tile, no dynamic tiling.
            return kind, torch.cat([tile_image(f, 1, size, 1, False) for f in frames]), [1] * len(frames)
        budget = spec.max_dynamic_patch or self.cfg.max_dynamic_patch
        per_image = max(1, budget // len(media)) if len(media) > 1 else budget
        tiles, counts = [], []
        for k, value in enumerate(media):
            field = "image" if not isinstance(obj.get("image"), list) else f"image[{k}]"
            img = self._open(spec, value, where, field)
            min_num = min(self.cfg.min_dynamic_patch, per_image)
            if not self.pixels:
                counts.append(count_tiles(*img.size, per_image, size, min_num, self.cfg.use_thumbnail))
                continue
            t = tile_image(img, per_image, size, min_num, self.cfg.use_thumbnail)
            tiles.append(t)
            counts.append(t.shape[0])
        return kind, (torch.cat(tiles) if tiles else None), counts

    def encode(self, spec: DatasetSpec, line_no: int, obj: dict) -> dict[str, Any]:
        """Encoded pair: ``{chosen,rejected}_{input_ids,labels}`` (1-D long), ``pixel_values``
        (``(tiles, 3, S, S)`` or None), ``num_tiles`` (per image/frame), ``dataset``, ``line``."""
        where = f"{spec.annotation}:{line_no}"
        question = _text_field(obj, "question", where)
        chosen = _text_field(obj, "chosen", where)
        rejected = _text_field(obj, "rejected", where)
        if chosen == rejected:
            raise SampleError(
                f"{where}: fields 'chosen' and 'rejected' are identical", "chosen_equals_rejected"
            )
        for field, text in (("question", question), ("chosen", chosen), ("rejected", rejected)):
            found = next((t for t in RESERVED_TOKENS if t in text), None)
            if found:
                # The tokenizer would read it as the special token: image features land in the
                # wrong place, or a turn ends early.
                raise SampleError(
                    f"{where}: field '{field}' contains the reserved token {found!r} "
                    "(the template inserts these itself)",
                    "reserved_token",
                )
        kind, pixel_values, tiles = self.images(spec, obj, where)
        try:
            if kind == "video":
                question = expand_video_placeholder(question, len(tiles))
            expanded = expand_image_placeholders(question, [n * self.vision.tokens_per_tile for n in tiles])
        except TemplateError as exc:
            raise SampleError(f"{where}: field 'question': {exc}", "placeholder_mismatch") from exc
        try:
            prompt = self.template.encode_prompt(expanded)
            answers = {
                "chosen": self.template.encode_answer(chosen),
                "rejected": self.template.encode_answer(rejected),
            }
        except TemplateError as exc:
            raise SampleError(f"{where}: field 'chosen'/'rejected': {exc}", "bad_answer") from exc
        out: dict[str, Any] = {
            "pixel_values": pixel_values,
            "num_tiles": tiles,
            "dataset": spec.name,
            "line": line_no,
        }
        for name, (ids, labels) in answers.items():
            ids, labels = self._fit(prompt, ids, labels, name, where)
            out[f"{name}_input_ids"] = torch.tensor(prompt + ids, dtype=torch.long)
            out[f"{name}_labels"] = torch.tensor([IGNORE_INDEX] * len(prompt) + labels, dtype=torch.long)
        return out

    def _fit(self, prompt: list[int], ids: list[int], labels: list[int], name: str, where: str):
        """Apply ``max_length``: the prompt (holding every image span) is never cut."""
        max_len = self.cfg.max_length
        self.last_full_lengths[name] = len(prompt) + len(ids)
        if len(prompt) + len(ids) <= max_len:
            return ids, labels
        # At least one answer token must stay trained after "<|im_start|>assistant\n".
        min_keep = len(self.template.prefix_ids) + 1
        if self.cfg.truncation == "skip" or max_len - len(prompt) < min_keep:
            reason = "too_long" if self.cfg.truncation == "skip" else "prompt_too_long"
            raise SampleError(
                f"{where}: {name} sequence is {len(prompt) + len(ids)} tokens (prompt {len(prompt)}), "
                f"over data.max_length={max_len} (data.truncation={self.cfg.truncation})",
                reason,
                policy=True,
            )
        keep = max_len - len(prompt)
        self.truncated[name] += 1
        return ids[:keep], labels[:keep]


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded pairs over an MMPR meta file (or JSONL / HF datasets source).

    With ``on_bad_sample=error`` a bad line raises a ``SampleError`` naming file, line and field.
    With ``skip`` it returns None (the collator drops it), counts the reason in ``skipped`` and
    raises once the bad share exceeds ``max_bad_fraction`` (judged after ``min(len, 100)``
    samples, so one early bad line does not end a run). Length skips (``truncation=skip`` or a
    prompt over ``max_length``) are counted in ``skipped`` too but are never errors.

    The counters live in the process that reads the data: with DataLoader workers each worker
    keeps its own. Training therefore wraps the dataset in ``mpo.data.events.RecordingDataset``,
    whose items carry their events to the trainer; ``report(events)`` writes those totals.
    """

    def __init__(self, meta_path: str | Path, tokenizer, vision: VisionSpec, data_cfg, pixels: bool = True):
        self.meta_path = Path(meta_path)
        self.source = MixedSource(read_meta(meta_path), seed=data_cfg.seed)
        self.encoder = PairEncoder(tokenizer, vision, data_cfg, pixels=pixels)
        self.cfg = data_cfg
        self.seen = 0
        self.bad = 0
        self.skipped: Counter[str] = Counter()
        self.skip_examples: dict[str, list[str]] = {}
        self.last_skip: str | None = None
        # InternVL's data_augment is a random JPEG re-compression (quality 75-100) of every image;
        # we keep pixels deterministic (reference caches and resumes depend on it) and say so.
        self.augment_ignored = [s.name for s in self.source.specs if s.data_augment]
        if self.augment_ignored:
            logger.warning(
                "data_augment is not applied (pixels stay deterministic) for: %s", self.augment_ignored
            )

    def __len__(self) -> int:
        return len(self.source)

    @property
    def truncated(self) -> Counter[str]:
        """Responses cut at ``max_length`` so far, by ``chosen``/``rejected``."""
        return self.encoder.truncated

    @property
    def skip_log(self) -> list[str]:
        return [m for msgs in self.skip_examples.values() for m in msgs]

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        return self.guarded(lambda: self.source.get(i))

    def guarded(self, read) -> dict[str, Any] | None:
        """Read and encode one record with the bad-sample policy applied.

        Args:
            read: callable returning ``(spec, line_no, obj)``; may raise ``DataError``.
        """
        self.seen += 1
        pair = None
        try:
            spec, line_no, obj = read()
            pair = self.encoder.encode(spec, line_no, obj)
        except DataError as exc:
            policy = getattr(exc, "policy", False)
            if getattr(exc, "fatal", False) or (self.cfg.on_bad_sample == "error" and not policy):
                raise
            self._count(getattr(exc, "reason", "invalid_sample"), str(exc), policy)
        if self.bad:
            self.check_bad_fraction(final=False)
        return pair

    def _count(self, reason: str, message: str, policy: bool) -> None:
        self.last_skip = message
        self.skipped[reason] += 1
        kept = self.skip_examples.setdefault(reason, [])
        if len(kept) < SKIP_EXAMPLES_KEPT:
            kept.append(message)
        if not policy:
            self.bad += 1

    def check_bad_fraction(self, final: bool = True) -> None:
        """Raise DataError when bad samples exceed ``max_bad_fraction`` of those seen.

        Args:
            final: judge now (end of a full pass); otherwise only after ``min(len, 100)`` samples.
        """
        if self.seen == 0 or (not final and self.seen < min(len(self), 100)):
            return
        limit = self.cfg.max_bad_fraction
        if self.bad > limit * self.seen:
            bad = {k: v for k, v in self.skipped.items()}
            raise DataError(
                f"{self.meta_path}: {self.bad} of {self.seen} samples are bad ({self.bad / self.seen:.2%}), "
                f"over data.max_bad_fraction={limit}; skips by reason: {bad}; first: {self.skip_log[:3]}"
            )

    def report(self, events=None) -> dict[str, Any]:
        """Counts for the skip report: samples seen, bad, skips by reason, truncations, examples.

        Args:
            events: a ``DataEvents`` total gathered from training batches (all workers and
                ranks); None reports this process's own counters.
        """
        if events is None:
            seen, bad, skipped, truncated, examples = (
                self.seen,
                self.bad,
                self.skipped,
                self.truncated,
                self.skip_examples,
            )
        else:
            seen, bad, skipped, truncated, examples = (
                events.seen,
                events.bad,
                events.skipped,
                events.truncated,
                events.examples,
            )
        return {
            "meta_path": str(self.meta_path),
            "samples": len(self),
            "seen": seen,
            "bad": bad,
            "skipped": dict(skipped),
            "truncated_responses": dict(truncated),
            "max_bad_fraction": self.cfg.max_bad_fraction,
            "data_augment_ignored": self.augment_ignored,
            "examples": examples,
        }

    def write_skip_report(self, out_dir: str | Path, name: str = "data_skips.json", events=None) -> Path:
        """Write ``report(events)`` as JSON into ``out_dir`` (created if needed); returns the path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / name
        path.write_text(json.dumps(self.report(events), indent=1, ensure_ascii=False))
        return path
