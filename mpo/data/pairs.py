"""One MMPR line -> one encoded preference pair (images tiled once, shared by both answers)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from mpo.data.mmpr import DataError, DatasetSpec, MixedSource, read_meta
from mpo.data.template import IGNORE_INDEX, TemplateEncoder, TemplateError, expand_image_placeholders
from mpo.data.tiling import tile_image


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
    """A sample that cannot be used; ``reason`` is a short category for skip reports."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _text_field(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise SampleError(f"{where}: missing field '{key}'", f"missing_{key}")
    value = obj[key]
    if not isinstance(value, str):
        raise SampleError(f"{where}: field '{key}' must be a string, got {type(value).__name__}", f"bad_{key}")
    if key != "question" and not value.strip():
        raise SampleError(f"{where}: field '{key}' is empty", f"empty_{key}")
    return value


def resolve_media(root: Path, rel: Any, where: str, field: str) -> Path:
    """Join ``rel`` to ``root``, refusing paths that escape the root."""
    if not isinstance(rel, str) or not rel:
        raise SampleError(f"{where}: field '{field}' must be a non-empty path string", f"bad_{field}")
    root_resolved = root.resolve()
    path = (root / rel).resolve()
    if root_resolved != path and root_resolved not in path.parents:
        raise SampleError(f"{where}: field '{field}': path '{rel}' escapes the dataset root {root}", "path_escapes_root")
    return path


def load_image(path: Path, where: str, field: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise SampleError(f"{where}: field '{field}': image not found: {path}", "missing_image") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SampleError(f"{where}: field '{field}': cannot decode image {path}: {exc}", "corrupt_image") from exc


class PairEncoder:
    """Turns a parsed MMPR record into model inputs for the chosen and rejected answers."""

    def __init__(self, tokenizer, vision: VisionSpec, data_cfg):
        self.template = TemplateEncoder(tokenizer, data_cfg.system_message)
        self.vision = vision
        self.cfg = data_cfg
        self.truncated = 0

    def images(self, spec: DatasetSpec, obj: dict, where: str) -> tuple[torch.Tensor | None, list[int]]:
        """Tiles of every image in the record (None for text-only) and the tile count per image."""
        if "video" in obj and obj["video"] is not None:
            from mpo.data.video import video_frames  # PyAV only when a video appears

            frames = video_frames(resolve_media(spec.root, obj["video"], where, "video"), self.cfg, where)
            tiles = [tile_image(f, 1, self.vision.image_size, 1, False) for f in frames]
            return torch.cat(tiles), [1] * len(tiles)
        image = obj.get("image")
        if image is None or image == []:
            return None, []
        paths = image if isinstance(image, list) else [image]
        budget = spec.max_dynamic_patch or self.cfg.max_dynamic_patch
        per_image = max(1, budget // len(paths)) if len(paths) > 1 else budget
        tiles, counts = [], []
        for k, rel in enumerate(paths):
            field = "image" if len(paths) == 1 else f"image[{k}]"
            img = load_image(resolve_media(spec.root, rel, where, field), where, field)
            t = tile_image(img, per_image, self.vision.image_size, min(self.cfg.min_dynamic_patch, per_image), self.cfg.use_thumbnail)
            tiles.append(t)
            counts.append(t.shape[0])
        return torch.cat(tiles), counts

    def encode(self, spec: DatasetSpec, line_no: int, obj: dict) -> dict[str, Any]:
        where = f"{spec.annotation}:{line_no}"
        question = _text_field(obj, "question", where)
        chosen = _text_field(obj, "chosen", where)
        rejected = _text_field(obj, "rejected", where)
        if chosen == rejected:
            raise SampleError(f"{where}: fields 'chosen' and 'rejected' are identical", "chosen_equals_rejected")
        pixel_values, tiles = self.images(spec, obj, where)
        if "video" in obj and obj["video"] is not None:
            question = "".join(f"Frame{i + 1}: <image>\n" for i in range(len(tiles))) + question.replace("<video>\n", "").replace("<video>", "")
        try:
            expanded = expand_image_placeholders(question, [n * self.vision.tokens_per_tile for n in tiles])
            prompt = self.template.encode_prompt(expanded)
            c_ids, c_labels = self.template.encode_answer(chosen)
            r_ids, r_labels = self.template.encode_answer(rejected)
        except TemplateError as exc:
            raise SampleError(f"{where}: field 'question': {exc}", "placeholder_mismatch") from exc
        max_len = self.cfg.max_length
        # Never cut the prompt (it holds the image spans): only the response tail may go.
        if len(prompt) + 2 > max_len:
            raise SampleError(f"{where}: prompt alone is {len(prompt)} tokens, over data.max_length={max_len}", "prompt_too_long")
        out = {"pixel_values": pixel_values, "num_tiles": tiles, "dataset": spec.name, "line": line_no}
        for name, ids, labels in (("chosen", c_ids, c_labels), ("rejected", r_ids, r_labels)):
            if len(prompt) + len(ids) > max_len:
                if self.cfg.truncation == "skip":
                    raise SampleError(f"{where}: {name} sequence is {len(prompt) + len(ids)} tokens, over data.max_length={max_len}", "too_long")
                keep = max_len - len(prompt)
                ids, labels = ids[:keep], labels[:keep]
                self.truncated += 1
            out[f"{name}_input_ids"] = torch.tensor(prompt + ids, dtype=torch.long)
            out[f"{name}_labels"] = torch.tensor([IGNORE_INDEX] * len(prompt) + labels, dtype=torch.long)
        return out


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded pairs over an MMPR meta file.

    With ``on_bad_sample=error`` a bad line raises a ``SampleError`` naming file, line and field.
    With ``skip`` it returns None (the collator drops it) and counts the reason in ``skipped``.
    """

    def __init__(self, meta_path: str | Path, tokenizer, vision: VisionSpec, data_cfg):
        self.source = MixedSource(read_meta(meta_path), seed=data_cfg.seed)
        self.encoder = PairEncoder(tokenizer, vision, data_cfg)
        self.cfg = data_cfg
        self.skipped: Counter[str] = Counter()
        self.skip_log: list[str] = []

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        try:
            spec, line_no, obj = self.source.get(i)
            return self.encoder.encode(spec, line_no, obj)
        except DataError as exc:
            if self.cfg.on_bad_sample == "error":
                raise
            self.skipped[getattr(exc, "reason", "invalid_json")] += 1
            self.skip_log.append(str(exc))
            return None
