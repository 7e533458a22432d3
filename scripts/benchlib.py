"""What scripts/benchmark.py and scripts/gpu_check.py measure with: model shapes, data, TRL's side,
model FLOPs, the machine's matmul peak, and recorders for steps and batches.

Model shapes. ``internvl2_5_1b`` and ``internvl2_5_8b`` are the real architectures' sizes (vision:
InternViT-300M, 448 px tiles of 14 px patches, 256 LLM tokens per tile; LLM: Qwen2.5-0.5B and
InternLM2.5-7B, hosted here as a Qwen2 text model of the same sizes, which has the same FLOPs).
``cpu_1b`` and ``cpu_8b`` are CPU-sized look-alikes: the same tiles and tokens per tile, and, on
the benchmark data (1-7 tiles, answers of 5-800 tokens), the same split of forward FLOPs per pair
between the vision tower and the LLM as the model they stand for (1.37 : 1 against 1.35 : 1 for
1B, 0.085 : 1 against 0.080 : 1 for 8B) and the same share of the LM head in the LLM's FLOPs
(3.7 % and 0.6 %). The split decides what one vision pass per pair saves; the LM-head share what
TRL's full-sequence LM head on CPU costs. Widths this small make attention, not the projections,
most of the work, and keep a CPU pair well under a second.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

_VIT_300M = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    image_size=448, patch_size=14, layer_scale_init_value=0.1, use_mean_pooling=True,
)  # fmt: skip
SHAPES: dict[str, dict[str, Any]] = {
    "internvl2_5_1b": {
        "vision": _VIT_300M,
        "text": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, max_position_embeddings=32768, rope_theta=1e6,
                     tie_word_embeddings=True),
        "vocab_size": 151674,
    },
    "internvl2_5_8b": {
        "vision": _VIT_300M,
        "text": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, max_position_embeddings=32768, rope_theta=1e6,
                     tie_word_embeddings=False),
        "vocab_size": 92553,
    },
    "cpu_1b": {
        "vision": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128,
                       image_size=448, patch_size=14, layer_scale_init_value=0.1, use_mean_pooling=True),
        "text": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=128, max_position_embeddings=8192, rope_theta=1e6, tie_word_embeddings=True),
        "vocab_size": 1200,
    },
    "cpu_8b": {
        "vision": dict(hidden_size=10, num_hidden_layers=1, num_attention_heads=1, intermediate_size=40,
                       image_size=448, patch_size=14, layer_scale_init_value=0.1, use_mean_pooling=True),
        "text": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                     intermediate_size=192, max_position_embeddings=8192, rope_theta=1e6, tie_word_embeddings=False),
        "vocab_size": 640,
    },
}  # fmt: skip

# Image sizes whose InternVL grids (max_dynamic_patch 6, thumbnail on) give 1, 3, 4, 5, 6, 7 tiles.
TILE_SIZES = {1: (448, 448), 3: (896, 448), 4: (1344, 448), 5: (896, 896), 6: (2240, 448), 7: (1344, 896)}
MAX_DYNAMIC_PATCH = 6
WORDS = (
    "the chart shows a red bar and a blue line rising over five years while the green area stays flat "
    "so the answer is that sales grew faster than costs in every quarter except the last one"
).split()


# ---- model and data --------------------------------------------------------------------------
def build_model_dir(out: Path, shape: str, seed: int = 0) -> Path:
    """Save a random-weight InternVL of ``shape`` and the test tokenizer in HF format."""
    import torch
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    from mpo.model.tiny import build_config, build_tokenizer

    spec = SHAPES[shape]
    tok = build_tokenizer()
    config = build_config(tok, vision=spec["vision"], text=spec["text"])
    config.text_config.vocab_size = spec["vocab_size"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _answer(rng: random.Random, tokenizer, n_tokens: int) -> str:
    """Words until the text is ``n_tokens`` tokens (or one more) long."""
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def write_pairs(
    out: Path, n_pairs: int, tiles: list[int], answer_tokens: tuple[int, int], seed: int = 0
) -> Path:
    """MMPR-format pairs, the tiles of each image drawn from ``tiles`` and each answer's length
    log-uniform in ``answer_tokens`` (many short answers, a few long ones); returns the meta file."""
    from PIL import Image, ImageDraw

    from mpo.model.tiny import build_tokenizer

    tok = build_tokenizer()
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lo, hi = (math.log(t) for t in answer_tokens)
    lines = []
    for i in range(n_pairs):
        size = TILE_SIZES[rng.choice(tiles)]
        img = Image.new("RGB", size, (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randint(0, size[0] - 60), rng.randint(0, size[1] - 60)
            draw.rectangle(
                (x, y, x + rng.randint(20, 300), y + rng.randint(20, 300)),
                fill=(rng.randint(0, 255), 80, 160),
            )
        img.save(out / "images" / f"{i}.png")
        chosen, rejected = (_answer(rng, tok, round(math.exp(rng.uniform(lo, hi)))) for _ in range(2))
        row = {"image": f"images/{i}.png", "question": "<image>\nWhat does the chart show?"}
        lines.append(json.dumps({**row, "chosen": chosen + ".", "rejected": rejected + "!"}))
    (out / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    meta = {
        "bench": {
            "root": ".",
            "annotation": "pairs.jsonl",
            "repeat_time": 1,
            "max_dynamic_patch": MAX_DYNAMIC_PATCH,
        }
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out / "meta.json"


# ---- TRL's side ------------------------------------------------------------------------------
def processor_class():
    """A minimal InternVL processor for TRL (tiles images, expands ``<image>``, tokenizes), with our
    tiling code: transformers' ``InternVLProcessor`` needs torchvision, which breaks CPU torch."""
    import torch
    from transformers import BatchFeature, ProcessorMixin

    from mpo.data.template import expand_image_placeholders
    from mpo.data.tiling import tile_image

    class InternVLPairProcessor(ProcessorMixin):
        def __init__(self, tokenizer, image_size: int, tokens_per_tile: int, max_tiles: int):  # noqa: D107
            self.tokenizer, self.image_size = tokenizer, image_size
            self.tokens_per_tile, self.max_tiles = tokens_per_tile, max_tiles
            self.chat_template = None

        def __call__(self, images=None, text=None, padding=True, padding_side="right", return_tensors="pt",
                     add_special_tokens=False, **kw):  # fmt: skip
            texts, pixels = list(text), []
            for k, imgs in enumerate(images or []):
                tiles = [tile_image(im, self.max_tiles, self.image_size, 1, True) for im in imgs]
                pixels += tiles
                texts[k] = expand_image_placeholders(
                    texts[k], [t.shape[0] * self.tokens_per_tile for t in tiles]
                )
            enc = self.tokenizer(texts, padding=padding, padding_side=padding_side, return_tensors=return_tensors,
                                 add_special_tokens=add_special_tokens)  # fmt: skip
            data = dict(enc)
            if pixels:
                data["pixel_values"] = torch.cat(pixels)
            return BatchFeature(data)

    return InternVLPairProcessor


def trl_dataset(meta: Path, system_message: str | None = None):
    """The same pairs as TRL expects them: images, rendered prompt, answers ending in ``<|im_end|>``."""
    from datasets import Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    from mpo.data.template import ASSISTANT_PREFIX, system_turn, user_turn

    rows = []
    for line in (meta.parent / "pairs.jsonl").read_text().splitlines():
        obj = json.loads(line)
        with PILImage.open(meta.parent / obj["image"]) as im:
            img = im.convert("RGB")
        prompt = system_turn(system_message) + user_turn(obj["question"]) + ASSISTANT_PREFIX
        rows.append({"images": [img], "prompt": prompt, "chosen": obj["chosen"] + "<|im_end|>",
                     "rejected": obj["rejected"] + "<|im_end|>"})  # fmt: skip
    string = Value("string")
    features = Features({"images": Sequence(Image()), "prompt": string, "chosen": string, "rejected": string})
    return Dataset.from_list(rows, features=features)


# ---- FLOPs and the machine's peak ------------------------------------------------------------
def _size(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def vision_flops_per_tile(vc) -> float:
    """Forward FLOPs of the vision tower + projector on one tile (2 per multiply-add; attention
    scores and values 4·n²·h per layer)."""
    n = (_size(vc.image_size) // _size(vc.patch_size)) ** 2 + 1
    h, inter = vc.hidden_size, vc.intermediate_size
    layer = 2 * n * (4 * h * h + 2 * h * inter) + 4 * n * n * h
    patch = 2 * (n - 1) * 3 * _size(vc.patch_size) ** 2 * h
    return vc.num_hidden_layers * layer + patch


def llm_flops(tc, seq_len: int) -> float:
    """Forward FLOPs of the LLM's layers on one sequence of ``seq_len`` tokens (causal attention
    counted in full, 4·n²·h per layer, as the usual MFU convention)."""
    h = tc.hidden_size
    kv = tc.num_key_value_heads * (h // tc.num_attention_heads)
    per_token = 2 * (2 * h * h + 2 * h * kv + 3 * h * tc.intermediate_size)
    return tc.num_hidden_layers * (per_token * seq_len + 4 * seq_len * seq_len * h)


def pair_flops(config, tiles: int, seq_lens: tuple[int, int], response_tokens: int) -> dict[str, float]:
    """Forward FLOPs of one pair as the math defines it: the vision tower once on its tiles, the
    LLM over both full sequences, the LM head on response positions only."""
    tc = config.text_config
    return {
        "vision": tiles * vision_flops_per_tile(config.vision_config),
        "llm": sum(llm_flops(tc, n) for n in seq_lens),
        "head": 2 * tc.hidden_size * tc.vocab_size * response_tokens,
    }


def matmul_peak_flops(device: str = "cpu", n: int = 1536, reps: int = 5) -> float:
    """The best FLOP/s of an ``n x n`` matmul on ``device`` (float32 on CPU, bf16 on CUDA)."""
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = math.inf
    for _ in range(reps + 1):  # the first call warms up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ---- recorders -------------------------------------------------------------------------------
def batch_stats(batch: dict, pad_id: int) -> dict[str, Any]:
    """What a batch holds, from any of the three layouts (ours plain, ours packed, TRL's):
    pairs, tiles (each pair's once), the two sequences' lengths per pair, trained positions,
    and the positions the LLM computes (``computed``) of which ``real`` are tokens, not padding."""
    from mpo.data.template import IGNORE_INDEX

    if "pairs" in batch:  # ours, packed: (K, 5) row, start, prefix, chosen suffix, rejected suffix
        p = batch["pairs"].tolist()
        seqs = [(pre + c, pre + r) for _, _, pre, c, r in p]
        trained = int(batch["scored"].shape[0])
        real, computed = sum(pre + c + r for _, _, pre, c, r in p), batch["input_ids"].numel()
    else:
        mask = batch["attention_mask"]
        half = mask.shape[0] // 2
        lens = mask.sum(-1).tolist()
        seqs = list(zip(lens[:half], lens[half:]))
        if "labels" in batch:  # ours, plain
            trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        else:  # TRL: completion_mask marks the trained tokens
            trained = int(batch["completion_mask"].sum())
        real, computed = int(mask.sum()), mask.numel()
    pixels = batch.get("pixel_values")
    tiles = 0 if pixels is None else pixels.shape[0] // (1 if "labels" in batch or "pairs" in batch else 2)
    return {
        "pairs": len(seqs),
        "tiles": tiles,
        "seqs": seqs,
        "trained": trained,
        "real": real,
        "computed": computed,
    }


class RecordingCollator:
    """Wraps a collator and keeps ``batch_stats`` of every batch it makes, in order."""

    def __init__(self, collator, pad_id: int):
        self.collator, self.pad_id, self.batches = collator, pad_id, []

    def __call__(self, items):
        out = self.collator(items)
        batch = out[0] if isinstance(out, tuple) else out
        if batch.get("num_pairs", 1):
            self.batches.append(batch_stats(batch, self.pad_id))
        return out


def step_timer(warmup: int, device: str):
    """A TrainerCallback keeping the wall-clock time of the steps after ``warmup``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.steps = 0

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            if state.global_step == warmup:
                self.t0 = time.perf_counter()
            elif state.global_step > warmup:
                self.t1, self.steps = time.perf_counter(), state.global_step - warmup

    return StepTimer()


# ---- one measured run ------------------------------------------------------------------------
def timed_pass(
    trainer, pad_id: int, device: str, warmup_epoch: bool = False, min_steps: int = 10
) -> tuple[float, int, list[dict]]:
    """Train ``trainer`` through a warm-up and then whole timed passes over its data, as many as
    make ``min_steps`` steps.

    Warm-up: one step (CPU), or a whole epoch (``warmup_epoch``: GPUs, where the first shapes
    compile). With one step the timed passes run from the second batch to a later epoch's first,
    which is the same batch: sequential data order, or our packed batches (the same groups every
    epoch, the largest first). So every pair is timed equally often whatever the batching. Returns
    (seconds, timed steps, ``batch_stats`` of the timed batches).
    """
    recorder = RecordingCollator(trainer.data_collator, pad_id)
    trainer.data_collator = recorder
    per_epoch = len(trainer.get_train_dataloader())
    warmup = per_epoch if warmup_epoch else 1
    timed = per_epoch * math.ceil(min_steps / per_epoch)
    trainer.args.max_steps = warmup + timed
    timer = step_timer(warmup, device)
    trainer.add_callback(timer)
    trainer.train()
    return timer.t1 - timer.t0, timer.steps, recorder.batches[warmup : warmup + timed]


def summarize(batches: list[dict], seconds: float, steps: int, config, reference_forward: bool) -> dict:
    """Throughputs of a timed pass, its padding share, and its model FLOP/s: ``pair_flops`` of
    every pair, 3x for the policy's forward and backward, +1x for a reference forward."""
    passes = 3 + int(reference_forward)
    flops = sum(
        passes * sum(pair_flops(config, b["tiles"] / b["pairs"], seq, b["trained"] / b["pairs"]).values())
        for b in batches
        for seq in b["seqs"]
    )
    sums = {k: sum(b[k] for b in batches) for k in ("pairs", "tiles", "real", "computed")}
    return {
        "steps": steps, "seconds": seconds, "pairs_per_s": sums["pairs"] / seconds,
        "tiles_per_s": sums["tiles"] / seconds, "tokens_per_s": sum(sum(s) for b in batches for s in b["seqs"]) / seconds,
        "padding_share": 1 - sums["real"] / sums["computed"], "pairs_per_step": sums["pairs"] / steps,
        "model_flops_per_s": flops / seconds,
    }  # fmt: skip
