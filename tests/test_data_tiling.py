"""Tiling against two independent computations: a brute-force grid choice written from the rule
(docs/internvl-format.md §2) and transformers' ``GotOcr2ImageProcessorPil`` configured as InternVL."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from mpo.data.tiling import IMAGENET_MEAN, IMAGENET_STD, choose_grid, count_tiles, tile_image

MAX_NUMS = (1, 4, 6, 12)
EXTREME_AND_TINY = [(3, 2), (2, 3), (1, 1), (56, 56), (1, 1000), (1000, 1), (5000, 20), (20, 5000)]


def brute_force_grid(w: int, h: int, max_num: int, size: int = 448, exact: bool = False) -> tuple[int, int]:
    """The rule stated without InternVL's loop: among the grids whose aspect ratio is closest to the
    image's, take the largest one the image area exceeds half of (in pixels), else the smallest."""
    grids = [(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if c * r <= max_num]
    aspect = Fraction(w, h) if exact else w / h
    diff = {g: abs(aspect - (Fraction(g[0], g[1]) if exact else g[0] / g[1])) for g in grids}
    best = min(diff.values())
    tied = sorted((g for g in grids if diff[g] == best), key=lambda g: g[0] * g[1])
    areas = [c * r for c, r in tied]
    # Two tied grids of one area would make the answer depend on set order; it never happens
    # with min_num=1 because (1, 1) is then closer (|a-1| < |a-c/r| for mirrored grids).
    assert len(set(areas)) == len(areas), (w, h, max_num, tied)
    bigger = [g for g in tied[1:] if w * h > 0.5 * size * size * g[0] * g[1]]
    return bigger[-1] if bigger else tied[0]


def all_sizes() -> list[tuple[int, int]]:
    sizes = set(EXTREME_AND_TINY)
    sides = [1, 2, 3, 7, 13, 28, 56, 100, 224, 447, 448, 449, 500, 672, 896, 900, 1000, 1344, 2000, 5000]
    sizes.update((w, h) for w in sides for h in sides)
    # Images whose aspect ratio equals a grid's at several scales: the tie cases.
    for c in range(1, 7):
        for r in range(1, 7):
            sizes.update((c * s, r * s) for s in (1, 56, 224, 300, 448, 1000))
    return sorted(sizes)


def test_documented_examples():
    assert choose_grid(448, 448, 1, 12, 448) == (1, 1)
    assert choose_grid(900, 900, 1, 12, 448) == (2, 2)
    assert choose_grid(1000, 1000, 1, 12, 448) == (3, 3)
    assert count_tiles(1000, 1000, 12, 448) == 10  # 3x3 + thumbnail
    assert count_tiles(56, 56, 12, 448) == 1  # a tiny image is still one full tile
    assert count_tiles(1, 1000, 12, 448) == 13  # 1x12 + thumbnail


@pytest.mark.parametrize("max_num", MAX_NUMS)
def test_grid_matches_brute_force_and_gotocr2(max_num):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    sizes = all_sizes()
    for w, h in sizes:
        ours = choose_grid(w, h, 1, max_num, 448)
        assert ours == brute_force_grid(w, h, max_num), (w, h, max_num)
        assert ours == get_optimal_tiled_canvas((h, w), (448, 448), 1, max_num), (w, h, max_num)
        assert ours[0] * ours[1] <= max_num


def test_float_ties_follow_internvl_not_exact_arithmetic():
    """5000x12000 (5/12) is exactly midway between 1/3 and 1/2; in floating point the two
    distances differ, InternVL's loop keeps the first (1, 2), and so must we."""
    assert brute_force_grid(5000, 12000, 3, exact=True) == (1, 3)
    assert brute_force_grid(5000, 12000, 3) == (1, 2)
    assert choose_grid(5000, 12000, 1, 3, 448) == (1, 2)


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _gotocr2(img: Image.Image, max_num: int, size: int) -> torch.Tensor:
    from transformers import GotOcr2ImageProcessorPil
    from transformers.image_utils import ChannelDimension

    proc = GotOcr2ImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_num,
    )
    # HWC given explicitly: a 3x2 image is otherwise "ambiguous" and may be read as CHW.
    return proc(img, input_data_format=ChannelDimension.LAST, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("max_num", MAX_NUMS)
def test_pixels_equal_gotocr2_small_tiles(max_num):
    """Many shapes at a 28px tile (fast): same tiles, thumbnail and normalisation, bit for bit."""
    size = 28
    shapes = EXTREME_AND_TINY + [
        (28, 28),
        (29, 28),
        (56, 28),
        (57, 28),
        (84, 56),
        (60, 20),
        (123, 45),
        (45, 123),
    ]
    for k, (w, h) in enumerate(shapes):
        img = _image(w, h, k)
        ours = tile_image(img, max_num, size)
        ref = _gotocr2(img, max_num, size)
        assert ours.shape == ref.shape, (w, h, max_num)
        assert ours.shape[0] == count_tiles(w, h, max_num, size)
        assert torch.equal(ours, ref), (w, h, max_num, (ours - ref).abs().max())


@pytest.mark.parametrize(
    "w,h,max_num", [(3, 2, 6), (56, 56, 12), (1, 1000, 4), (900, 900, 12), (560, 448, 12)]
)
def test_pixels_equal_gotocr2_at_448(w, h, max_num):
    img = _image(w, h, 0)
    ours = tile_image(img, max_num, 448)
    ref = _gotocr2(img, max_num, 448)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)


def test_tiles_are_row_major_crops_plus_thumbnail():
    """A 2x1 grid: tile 0 is the left half of the resized image, the last tile the thumbnail."""
    img = _image(100, 50, 3)
    tiles = tile_image(img, 4, 28)
    assert tiles.shape == (3, 3, 28, 28)
    resized = np.asarray(img.resize((56, 28), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    left = torch.from_numpy(((resized[:, :28] - mean) / std).transpose(2, 0, 1))
    # float32 vs the float64 reference: |x| ≤ (1 − 0.406)/0.225 ≈ 2.64 after normalising, so a few
    # ε·2.64 ≈ 3e-7 at most; atol 1e-6.
    torch.testing.assert_close(tiles[0], left, rtol=0, atol=1e-6)
    thumb = np.asarray(img.resize((28, 28), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    torch.testing.assert_close(
        tiles[2], torch.from_numpy(((thumb - mean) / std).transpose(2, 0, 1)), rtol=0, atol=1e-6
    )
