"""Deterministic demo preference data in the MMPR format: coloured shapes a tiny model can learn.

Each image holds one filled shape on a plain background. Questions ask the shape's colour or the
background's;
``chosen`` is the right answer with a short reason, ``rejected`` a wrong one. Answering needs
the image (every colour/shape is equally likely in both roles), so held-out preference accuracy
only rises above 0.5 when the model really uses the vision path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
SHAPES = ["circle", "square"]
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128)}


def draw_shape(
    color: str, shape: str, background: str, size: tuple[int, int], rng: random.Random
) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.28, 0.4))
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    else:
        d.rectangle(box, fill=COLORS[color])
    return img


def make_pair(rng: random.Random, image_rel: str, color: str, background: str) -> dict:
    if rng.random() < 0.7:
        wrong = rng.choice([c for c in COLORS if c != color])
        question = "<image>\nWhat color is the shape? Answer with one word."
        chosen = f"The shape is {color}."
        rejected = f"The shape is {wrong}."
        answer = color
    else:
        wrong = rng.choice([b for b in BACKGROUNDS if b != background])
        question = "What color is the background?"  # no placeholder: the loader prefixes "<image>\n"
        chosen = f"The background is {background}."
        rejected = f"The background is {wrong}."
        answer = background
    return {
        "image": image_rel,
        "question": question,
        "chosen": chosen,
        "rejected": rejected,
        "answer_gt": answer,
    }


def write_demo_data(
    out_dir: str | Path, n_train: int = 480, n_eval: int = 120, seed: int = 0
) -> dict[str, Path]:
    """Write images, ``train.jsonl``/``eval.jsonl`` and the two meta files; returns their paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        lines = []
        for i in range(n):
            color, shape, background = (
                rng.choice(list(COLORS)),
                rng.choice(SHAPES),
                rng.choice(list(BACKGROUNDS)),
            )
            # Mostly one tile; every fifth image is wide, so it is tiled 2x1 plus a thumbnail.
            size = (128, 64) if i % 5 == 4 else (64, 64)
            rel = f"images/{split}_{i:05d}.png"
            draw_shape(color, shape, background, size, rng).save(out / rel)
            lines.append(json.dumps(make_pair(rng, rel, color, background)))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        meta = {
            f"shapes_{split}": {
                "root": ".",
                "annotation": f"{split}.jsonl",
                "data_augment": False,
                "repeat_time": 1,
                "length": n,
                "max_dynamic_patch": 4,
            }
        }
        paths[split] = out / f"meta_{split}.json"
        paths[split].write_text(json.dumps(meta, indent=1))
    return paths
