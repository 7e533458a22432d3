"""InternVL dynamic-resolution tiling and pixel normalisation.

Same algorithm as ``dynamic_preprocess`` / ``build_transform`` in OpenGVLab/InternVL
(``internvl_chat/internvl/train/dataset.py``): choose the (cols, rows) grid whose aspect ratio is
closest to the image's (ties go to the larger grid only when the image area exceeds half the
grid's pixel area), resize with BICUBIC, cut row-major, append a thumbnail of the whole image when
there is more than one tile, then normalise with ImageNet mean/std.

The tile/token arithmetic of a checkpoint (tile size, tokens per tile) and the per-image tile
budget of multi-image samples live here too, so the data path, `mpo data` and export agree.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class VisionSpec:
    """What the data needs from a checkpoint's vision side: tile size and image tokens per tile.

    Tokens per tile = (tile / patch)² · downsample_ratio² (pixel unshuffle): 256 for InternVL's
    448 px tiles with 14 px patches and ratio 0.5. Never assumed: read from the checkpoint.
    """

    image_size: int
    tokens_per_tile: int

    @classmethod
    def from_config(cls, config: Any) -> VisionSpec:
        """From a native ``InternVLConfig`` (object or dict) or an original ``config.json`` dict.

        The original format's tile size is ``force_image_size`` when set (it wins over the ViT's
        own ``image_size``).
        """
        raw = config.to_dict() if hasattr(config, "to_dict") else config
        vc = raw["vision_config"]
        size = int(_first(raw.get("force_image_size") or vc["image_size"]))
        patch = int(_first(vc["patch_size"]))
        ratio = float(raw.get("downsample_ratio", 0.5))
        return cls(image_size=size, tokens_per_tile=int((size // patch) ** 2 * ratio**2))


def per_image_budget(budget: int, num_images: int) -> int:
    """Tiles each image of a ``num_images``-image sample may use: ``max(1, budget // n)``
    (InternVL's ``internvl_chat_mpo.py`` multi-image rule); a single image gets the whole budget."""
    return max(1, budget // num_images) if num_images > 1 else budget


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, in InternVL's order (by area)."""
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """The (cols, rows) grid InternVL picks for a ``width`` x ``height`` image."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Cut an RGB image into InternVL tiles (plus the thumbnail when there are several)."""
    width, height = image.size
    cols, rows = choose_grid(width, height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for i in range(cols * rows):
        x, y = (i % cols) * image_size, (i // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def count_tiles(
    width: int, height: int, max_num: int, image_size: int, min_num: int = 1, use_thumbnail: bool = True
) -> int:
    """How many tiles ``tile_image`` makes for a ``width`` x ``height`` image, without resizing."""
    cols, rows = choose_grid(width, height, min_num, max_num, image_size)
    return cols * rows + (1 if use_thumbnail and cols * rows != 1 else 0)


def normalize_tiles(tiles: list[Image.Image], image_size: int) -> torch.Tensor:
    """Tiles -> float tensor ``(num_tiles, 3, image_size, image_size)``, ImageNet-normalised."""
    out = torch.empty(len(tiles), 3, image_size, image_size, dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for k, tile in enumerate(tiles):
        if tile.size != (image_size, image_size):
            tile = tile.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arr = torch.from_numpy(np.asarray(tile.convert("RGB"), dtype=np.uint8).copy())
        out[k] = (arr.permute(2, 0, 1).float() / 255.0 - mean) / std
    return out


# InternVL's data_augment: each tile re-encoded as JPEG at a quality drawn from 75..100
# (``qualities`` and ``simulate_jpeg_degradation`` in internvl_chat/internvl/train/dataset.py,
# applied per tile by ``build_transform(is_train=True)``).
JPEG_QUALITIES = tuple(range(75, 101))


def jpeg_degrade(tile: Image.Image, quality: int) -> Image.Image:
    """``tile`` after a JPEG round trip at ``quality``."""
    buf = io.BytesIO()
    tile.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def tile_image(
    image: Image.Image,
    max_num: int,
    image_size: int,
    min_num: int = 1,
    use_thumbnail: bool = True,
    augment_rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """One image -> normalised tiles ``(num_tiles, 3, image_size, image_size)``.

    ``augment_rng``: apply InternVL's ``data_augment`` (a JPEG round trip per tile at a quality
    drawn from ``JPEG_QUALITIES`` with this generator); None keeps the pixels exact.
    """
    tiles = dynamic_tiles(image.convert("RGB"), min_num, max_num, image_size, use_thumbnail)
    if augment_rng is not None:
        tiles = [jpeg_degrade(t, int(augment_rng.choice(JPEG_QUALITIES))) for t in tiles]
    return normalize_tiles(tiles, image_size)
