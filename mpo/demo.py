"""Deterministic demo preference data in the MMPR format: coloured shapes a tiny model can learn.

Each image holds one filled shape on a plain background. Questions ask the shape's colour or the
background's;
``chosen`` is the right answer with a short reason, ``rejected`` a wrong one. Answering needs
the image (every colour/shape is equally likely in both roles), so held-out preference accuracy
only rises above 0.5 when the model really uses the vision path.
"""

from __future__ import annotations

import base64
import csv
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


BENCHMARK_COLUMNS = ("index", "question", "A", "B", "C", "D", "answer", "category", "image")


def write_demo_benchmark(data_dir: str | Path, out_name: str = "shapes.tsv", seed: int = 0) -> Path:
    """A multiple-choice benchmark in VLMEvalKit's TSV layout from the demo's held-out pairs.

    One question per line of ``eval.jsonl``, in the demo's own wording (the tiny model knows no
    other): "What color is the shape? Answer with one word." with four colours as options
    (category ``shape color``) or "What color is the background?" with the three backgrounds
    (``background color``), the image inlined as base64, the right option's letter in ``answer``.
    The images are the held-out ones, never trained on. Options are shuffled with ``seed``, so the
    right letter is spread over A-D.
    """
    data = Path(data_dir)
    rng = random.Random(seed)
    rows = []
    for k, line in enumerate((data / "eval.jsonl").read_text().splitlines()):
        pair = json.loads(line)
        truth = pair["answer_gt"]
        if truth in COLORS:
            question, category = "What color is the shape? Answer with one word.", "shape color"
            options = [truth, *rng.sample([c for c in COLORS if c != truth], 3)]
        else:
            question, category = "What color is the background?", "background color"
            options = list(BACKGROUNDS)
        rng.shuffle(options)
        letters = "ABCD"[: len(options)]
        row = {"index": k, "question": question, "category": category}
        row |= {letter: text for letter, text in zip(letters, options)}
        row["answer"] = letters[options.index(truth)]
        row["image"] = base64.b64encode((data / pair["image"]).read_bytes()).decode("ascii")
        rows.append(row)
    path = data / out_name
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=BENCHMARK_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path
