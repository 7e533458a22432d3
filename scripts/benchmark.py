"""Throughput and peak memory of our MPOTrainer against TRL 1.16's DPOTrainer running MPO.

    python scripts/benchmark.py                       # CPU-sized InternVL2.5-1B look-alike, both ref modes
    python scripts/benchmark.py --ref-cache on        # ours with the reference cache only
    python scripts/benchmark.py --device cuda --model-config internvl2_5_1b   # real 1B shapes, random weights

Both trainers get the same model checkpoint (random weights, saved once), the same pairs and
images, the same micro-batch size, learning rate and optimizer, and the same MPO objective:
TRL's ``loss_type=["sigmoid", "bco_pair", "sft"]``, ``loss_weights=[0.8, 0.2, 1.0]`` (MPO paper §3.2; TRL 1.16).
Each measured run is a fresh subprocess (so its peak RSS is its own); rounds alternate the order
of the trainers so neither always runs on a warmer machine. Throughput counts the steps after
``--warmup`` steps; the figure reported is the median over rounds, the peak memory the maximum.

TRL needs a ``ProcessorMixin`` for vision data; ``InternVLPairProcessor`` below does what
``InternVLProcessor`` does for one image per prompt (InternVL tiling, ``<image>`` expanded to
``<img><IMG_CONTEXT>x256n</img>``) with our tiling code, because transformers' own processor needs
torchvision, which breaks CPU torch (pyproject.toml).

The default model follows InternVL2.5-1B's proportions at CPU size: 448px tiles of 14px patches
(1025 vision tokens, 256 LLM tokens per tile), the vision tower about half the LLM's parameters
(0.52x; real 0.62x), a vocabulary large against the hidden size (12,288 rows for hidden 96, 128 per unit
of width; real: 151,674 for 896, 169), and, what decides the speedup, the same split of forward
FLOPs per pair between the vision tower and the LLM (1.35 : 1 here for 4-7 tiles; 1.40 : 1 for
the real shapes, ``forward_flops_per_pair``). The embedding is padded beyond the small test tokenizer, as Qwen's own is beyond
its tokenizer: the LM head costs the same, the extra rows are just never targets.

Where the difference comes from: TRL 1.16's ``fused_lm_head`` scores only response positions on
Triton (CUDA) devices, but on CPU it runs every position, image tokens included, through the LM
head (in chunks; ``trl/trainer/utils.py``, "Elsewhere ... every position is scored"), for policy
and reference; ours scores response positions only on every device. TRL also repeats every
image for the rejected row, so its policy runs the vision tower on twice the tiles (forward and
backward) and its reference again on twice the tiles; ours runs it once per pair, and with the
reference cache runs no reference forward and holds no reference model at all. So the gain
scales with the vision tower's share of the compute: with V and L the forward cost of the
vision tower and of the LLM (both rows) per pair, TRL costs about 8V + 4L, ours 4V + 4L without
and 3V + 3L with the cache (with V = 1.35 L: 1.6x without and 2.1x with the cache, the figures to expect on CUDA,
where TRL's LM head is response-only too). Under load from other processes wall-clock figures are noisy; each
run also reports pairs per CPU-second and the 1-minute load average.

Prints one JSON line: ours_pairs_per_s, trl_pairs_per_s, speedup, ours_peak_rss_mb,
trl_peak_rss_mb, memory_ratio, config (and, with ``--ref-cache both``, the same figures for ours
without the cache under ``without_ref_cache``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# CPU-sized InternVL2.5-1B look-alike (see module docstring) and the real 1B architecture (docs/internvl-format.md §1).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "cpu_small": {
        "vision": dict(
            hidden_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=640,
            image_size=448,
            patch_size=14,
            layer_scale_init_value=0.1,
            use_mean_pooling=True,
        ),
        "text": dict(
            hidden_size=96,
            num_hidden_layers=4,
            num_attention_heads=3,
            num_key_value_heads=1,
            intermediate_size=384,
            max_position_embeddings=8192,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
        "vocab_size": 12288,
    },
    "internvl2_5_1b": {
        "vision": dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=448,
            patch_size=14,
            layer_scale_init_value=0.1,
            use_mean_pooling=True,
        ),
        "text": dict(
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
        "vocab_size": 151674,
    },
}

# Image sizes whose InternVL grids (max_dynamic_patch 6) plus the thumbnail give 4, 5, 7 and 6 tiles.
IMAGE_SIZES = [(1344, 448), (896, 896), (1344, 896), (2240, 448)]
MAX_DYNAMIC_PATCH = 6
WORDS = (
    "the chart shows a red bar and a blue line rising over five years while the green area stays flat "
    "so the answer is that sales grew faster than costs in every quarter except the last one"
).split()
H100_BF16_PEAK_FLOPS = 989e12  # dense bf16, NVIDIA H100 SXM datasheet


# ---- setup (parent process) ----------------------------------------------------------------


def build_model_dir(out: Path, model_config: str, seed: int = 0) -> Path:
    """Save the benchmark model (random weights) and tokenizer in HF format."""
    import torch
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    from mpo.model.tiny import build_config, build_tokenizer

    spec = MODEL_CONFIGS[model_config]
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


def write_data(out: Path, n_pairs: int, seed: int = 0) -> Path:
    """Pairs over 448px-tile images of 4-7 tiles, MMPR format; returns the meta file."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_pairs):
        size = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        img = Image.new("RGB", size, (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randint(0, size[0] - 60), rng.randint(0, size[1] - 60)
            d.rectangle(
                (x, y, x + rng.randint(20, 300), y + rng.randint(20, 300)),
                fill=(rng.randint(0, 255), 80, 160),
            )
        img.save(out / "images" / f"{i}.png")
        answer = lambda n: " ".join(rng.choice(WORDS) for _ in range(n)) + "."  # noqa: E731
        lines.append(
            json.dumps(
                {
                    "image": f"images/{i}.png",
                    "question": "<image>\nWhat does the chart show?",
                    "chosen": answer(rng.randint(30, 60)),
                    "rejected": answer(rng.randint(30, 60)),
                }
            )
        )
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


def experiment_config(a, model_dir: Path, meta: Path, cache_dir: Path):
    from mpo.config import load_config

    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.meta_path={meta}",
            f"model.ref_cache={cache_dir}",
            f"data.max_dynamic_patch={MAX_DYNAMIC_PATCH}",
            f"data.max_length={a.max_length}",
            f"model.torch_dtype={'bfloat16' if a.device == 'cuda' else 'float32'}",
            f"training.per_device_eval_batch_size={a.batch_size}",
            f"model.shared_prompt={str(bool(getattr(a, 'shared_prompt', False))).lower()}",
        ],
    )


# ---- the two trainers (child processes) -----------------------------------------------------


class StepTimer:
    """TrainerCallback timing the steps after warm-up (a plain class: transformers is imported late)."""

    def __new__(cls, warmup: int, device: str):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.warmup, self.device, self.t0, self.t1, self.steps = warmup, device, None, None, 0

            def _sync(self):
                if self.device == "cuda":
                    import torch

                    torch.cuda.synchronize()

            def on_step_end(self, args, state, control, **kw):
                self._sync()
                if state.global_step == self.warmup:
                    self.t0, self.c0 = time.perf_counter(), time.process_time()
                elif state.global_step > self.warmup:
                    self.t1, self.c1, self.steps = (
                        time.perf_counter(),
                        time.process_time(),
                        state.global_step - self.warmup,
                    )

        return _Timer()


def training_args(a, out: str) -> dict[str, Any]:
    return dict(
        output_dir=out,
        per_device_train_batch_size=a.batch_size,
        max_steps=a.warmup + a.steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        weight_decay=0.05,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        bf16=a.device == "cuda",
        use_cpu=a.device == "cpu",
        gradient_checkpointing=a.gradient_checkpointing,
        dataloader_num_workers=0,
        seed=0,
    )


def run_ours(a, work: Path, ref_cache: bool) -> Any:
    from transformers import TrainingArguments

    from mpo.data.collate import PairCollator
    from mpo.data.pairs import PairDataset, VisionSpec
    from mpo.loss import LossWeights
    from mpo.model.loading import load_model, load_tokenizer
    from mpo.trainer import MPOTrainer

    cfg = experiment_config(a, work / "model", work / "data" / "meta.json", work / "refcache")
    args = TrainingArguments(**training_args(a, str(work / "out-ours")))
    tok = load_tokenizer(cfg.model.path)
    model = load_model(cfg.model.path, cfg.model.torch_dtype, cfg.model.attn_implementation)
    ref = (
        None
        if ref_cache
        else load_model(cfg.model.path, cfg.model.torch_dtype, cfg.model.attn_implementation)
    )
    ds = PairDataset(cfg.data.meta_path, tok, VisionSpec.from_model_config(model.config), cfg.data)
    if ref_cache:
        from mpo.refcache import open_ref_cache

        ds = open_ref_cache(cfg.model.ref_cache, ds, cfg.model.path, cfg.model.torch_dtype)
    return MPOTrainer(
        model=model,
        args=args,
        ref_model=ref,
        train_dataset=ds,
        data_collator=PairCollator(tok.pad_token_id),
        processing_class=tok,
        loss_weights=LossWeights.from_config(cfg.loss),
        reference="cache" if ref_cache else "copy",
        logprob_chunk_size=cfg.model.logprob_chunk_size,
        shared_prompt=cfg.model.shared_prompt,
    )


def _processor_class():
    import torch
    from transformers import BatchFeature, ProcessorMixin

    from mpo.data.template import expand_image_placeholders
    from mpo.data.tiling import tile_image

    class InternVLPairProcessor(ProcessorMixin):
        """Minimal InternVL processor for TRL: tiles images, expands ``<image>``, tokenizes."""

        def __init__(self, tokenizer, image_size: int, tokens_per_tile: int, max_tiles: int):  # noqa: D107
            self.tokenizer, self.image_size, self.tokens_per_tile, self.max_tiles = (
                tokenizer,
                image_size,
                tokens_per_tile,
                max_tiles,
            )
            self.chat_template = None

        def __call__(
            self,
            images=None,
            text=None,
            padding=True,
            padding_side="right",
            return_tensors="pt",
            add_special_tokens=False,
            **kw,
        ):
            texts, pixels = list(text), []
            if images is not None:
                for k, imgs in enumerate(images):
                    tiles = [tile_image(im, self.max_tiles, self.image_size, 1, True) for im in imgs]
                    pixels += tiles
                    texts[k] = expand_image_placeholders(
                        texts[k], [t.shape[0] * self.tokens_per_tile for t in tiles]
                    )
            enc = self.tokenizer(
                texts,
                padding=padding,
                padding_side=padding_side,
                return_tensors=return_tensors,
                add_special_tokens=add_special_tokens,
            )
            data = dict(enc)
            if pixels:
                data["pixel_values"] = torch.cat(pixels)
            return BatchFeature(data)

    return InternVLPairProcessor


def trl_dataset(meta: Path, system_message: str | None):
    """The same pairs as TRL expects them: images + rendered prompt, answers ending in <|im_end|>."""
    from datasets import Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    from mpo.data.template import ASSISTANT_PREFIX, system_turn, user_turn

    root = meta.parent
    rows = []
    for line in (root / "pairs.jsonl").read_text().splitlines():
        obj = json.loads(line)
        with PILImage.open(root / obj["image"]) as im:
            img = im.convert("RGB")
        rows.append(
            {
                "images": [img],
                "prompt": system_turn(system_message) + user_turn(obj["question"]) + ASSISTANT_PREFIX,
                "chosen": obj["chosen"] + "<|im_end|>",
                "rejected": obj["rejected"] + "<|im_end|>",
            }
        )
    features = Features(
        {
            "images": Sequence(Image()),
            "prompt": Value("string"),
            "chosen": Value("string"),
            "rejected": Value("string"),
        }
    )
    return Dataset.from_list(rows, features=features)


def run_trl(a, work: Path) -> Any:
    from trl import DPOConfig, DPOTrainer

    from mpo.data.pairs import VisionSpec
    from mpo.model.loading import load_model, load_tokenizer

    dtype = "bfloat16" if a.device == "cuda" else "float32"
    tok = load_tokenizer(str(work / "model"))
    model = load_model(str(work / "model"), dtype)
    ref = load_model(str(work / "model"), dtype)
    vision = VisionSpec.from_model_config(model.config)
    proc = _processor_class()(tok, vision.image_size, vision.tokens_per_tile, MAX_DYNAMIC_PATCH)
    cfg = DPOConfig(
        **training_args(a, str(work / "out-trl")),
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        beta=0.1,
        max_length=None,
    )
    return DPOTrainer(
        model=model,
        ref_model=ref,
        args=cfg,
        train_dataset=trl_dataset(work / "data" / "meta.json", None),
        processing_class=proc,
    )


def child(a) -> None:
    """One measured run; prints a JSON line with pairs/s and peak memory."""
    import resource

    import torch

    work = Path(a.work_dir)
    trainer = run_trl(a, work) if a.child == "trl" else run_ours(a, work, a.child == "ours-cache")
    timer = StepTimer(a.warmup, a.device)
    trainer.add_callback(timer)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    pairs_per_s = timer.steps * a.batch_size / (timer.t1 - timer.t0)
    out = {
        "pairs_per_s": pairs_per_s,
        # CPU seconds of all threads: a check on the wall-clock figure when other jobs share the cores.
        "pairs_per_cpu_s": timer.steps * a.batch_size / (timer.c1 - timer.c0),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_avg_1m": os.getloadavg()[0],
    }
    if a.device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("BENCH " + json.dumps(out), flush=True)


# ---- parent ---------------------------------------------------------------------------------


def forward_flops_per_pair(work: Path) -> tuple[float, float]:
    """Forward FLOPs per pair (mean over the data) of the vision tower (one pass) and the LLM (both rows).

    Matmuls count 2 FLOPs per multiply-add; attention scores and values 4·n²·d per layer; the LM head
    only on response tokens (both trainers do that). Sequence lengths come from
    the length index (``mpo.data.lengths``: the longer row, used for both rows).
    """
    from transformers import AutoConfig

    from mpo.config import DataConfig
    from mpo.data.lengths import length_index
    from mpo.data.pairs import PairDataset, VisionSpec
    from mpo.model.loading import load_tokenizer

    cfg = AutoConfig.from_pretrained(work / "model")
    v, t = cfg.vision_config, cfg.text_config
    vis = VisionSpec.from_model_config(cfg)
    ds = PairDataset(
        work / "data" / "meta.json",
        load_tokenizer(str(work / "model")),
        vis,
        DataConfig(max_dynamic_patch=MAX_DYNAMIC_PATCH),
    )
    index = length_index(ds)
    lengths, tiles_per_pair = index.pair_tokens(ds.cfg.max_length), index.tiles
    n_vit = (
        vis.image_size // (v.patch_size[0] if isinstance(v.patch_size, (list, tuple)) else v.patch_size)
    ) ** 2 + 1
    vit_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    head = t.hidden_size // t.num_attention_heads
    llm_layer = (
        t.hidden_size * (2 * t.hidden_size + 2 * t.num_key_value_heads * head)
        + 3 * t.hidden_size * t.intermediate_size
    )
    vision, text = [], []
    for i, seq in enumerate(lengths.tolist()):
        spec, _, obj = ds.source.get(i)
        tiles = int(tiles_per_pair[i])
        vision.append(tiles * v.num_hidden_layers * (2 * vit_layer * n_vit + 4 * n_vit**2 * v.hidden_size))
        resp = len(ds.encoder.template._encode(obj["chosen"])) + len(
            ds.encoder.template._encode(obj["rejected"])
        )
        per_row = t.num_hidden_layers * (2 * llm_layer * seq + 4 * seq**2 * t.hidden_size)
        text.append(2 * per_row + 2 * t.hidden_size * t.vocab_size * resp)
    return statistics.mean(vision), statistics.mean(text)


def train_flops_per_pair(work: Path, with_ref_forward: bool) -> float:
    """Model FLOPs of one pair's training step: 3x forward (fwd + bwd), +1x for a reference forward.

    Counts one vision pass per pair, what the math needs whichever way a trainer runs it, so MFU
    compares the trainers on the same useful work.
    """
    vision, text = forward_flops_per_pair(work)
    return (vision + text) * (4 if with_ref_forward else 3)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default="cpu_small")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--ref-cache", choices=["on", "off", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch (both trainers)")
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps run before timing starts")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="on for both trainers (TRL's default is on)"
    )
    p.add_argument(
        "--shared-prompt", action="store_true", help="ours: prompt computed once per pair (mpo.shared_prompt)"
    )
    p.add_argument("--work-dir", default=None, help="model, data and cache go here (default: a temp folder)")
    p.add_argument("--child", choices=["ours-cache", "ours-ref", "trl"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(a, kind: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", kind, "--work-dir", a.work_dir]
    for k in ("model_config", "device", "batch_size", "steps", "warmup", "max_length"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    for flag in ("gradient_checkpointing", "shared_prompt"):
        if getattr(a, flag):
            argv.append(f"--{flag.replace('_', '-')}")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    found = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
    if proc.returncode != 0 or not found:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"benchmark run '{kind}' failed (exit {proc.returncode})")
    result = json.loads(found[-1][6:])
    print(f"  {kind:10s} {result}", file=sys.stderr, flush=True)
    return result


def summarise(runs: list[dict], key: str, fn) -> float:
    return fn(r[key] for r in runs)


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        child(a)
        return 0
    import tempfile

    a.work_dir = a.work_dir or tempfile.mkdtemp(prefix="mpo-bench-")
    work = Path(a.work_dir)
    n_pairs = a.batch_size * (a.warmup + a.steps)
    t0 = time.perf_counter()
    if not (work / "model" / "config.json").is_file():
        build_model_dir(work / "model", a.model_config)
    write_data(work / "data", n_pairs)
    variants = {"on": ["ours-cache"], "off": ["ours-ref"], "both": ["ours-cache", "ours-ref"]}[a.ref_cache]
    precompute_s = None
    if "ours-cache" in variants:
        from mpo.refcache import precompute_ref

        t = time.perf_counter()
        precompute_ref(
            experiment_config(a, work / "model", work / "data" / "meta.json", work / "refcache"), a.batch_size
        )
        precompute_s = time.perf_counter() - t
    print(f"setup {time.perf_counter() - t0:.1f}s in {work}", file=sys.stderr)
    runs: dict[str, list[dict]] = {k: [] for k in [*variants, "trl"]}
    for r in range(a.rounds):
        order = [*variants, "trl"] if r % 2 == 0 else ["trl", *variants]
        for kind in order:
            runs[kind].append(run_child(a, kind))

    def figures(kind: str) -> dict[str, float]:
        ours_ps = statistics.median(x["pairs_per_s"] for x in runs[kind])
        trl_ps = statistics.median(x["pairs_per_s"] for x in runs["trl"])
        ours_mb = max(x["peak_rss_mb"] for x in runs[kind])
        trl_mb = max(x["peak_rss_mb"] for x in runs["trl"])
        out = {
            "ours_pairs_per_s": round(ours_ps, 4),
            "trl_pairs_per_s": round(trl_ps, 4),
            "speedup": round(ours_ps / trl_ps, 3),
            "ours_peak_rss_mb": round(ours_mb, 1),
            "trl_peak_rss_mb": round(trl_mb, 1),
            "memory_ratio": round(ours_mb / trl_mb, 3),
        }
        if all("pairs_per_cpu_s" in x for x in runs[kind] + runs["trl"]):
            ours_c = statistics.median(x["pairs_per_cpu_s"] for x in runs[kind])
            trl_c = statistics.median(x["pairs_per_cpu_s"] for x in runs["trl"])
            out.update(
                {
                    "ours_pairs_per_cpu_s": round(ours_c, 4),
                    "trl_pairs_per_cpu_s": round(trl_c, 4),
                    "speedup_cpu_time": round(ours_c / trl_c, 3),
                }
            )
        if a.device == "cuda":
            ours_gpu = max(x["peak_gpu_mb"] for x in runs[kind])
            trl_gpu = max(x["peak_gpu_mb"] for x in runs["trl"])
            flops = train_flops_per_pair(work, kind == "ours-ref")
            out.update(
                {
                    "ours_peak_gpu_mb": round(ours_gpu, 1),
                    "trl_peak_gpu_mb": round(trl_gpu, 1),
                    "gpu_memory_ratio": round(ours_gpu / trl_gpu, 3),
                    "ours_mfu": round(flops * ours_ps / H100_BF16_PEAK_FLOPS, 4),
                    "trl_mfu": round(flops * trl_ps / H100_BF16_PEAK_FLOPS, 4),
                }
            )
        return out

    split = forward_flops_per_pair(work)
    main_kind = variants[0]
    result = figures(main_kind)
    if a.ref_cache == "both":
        result["without_ref_cache"] = figures("ours-ref")
    result["config"] = {
        "model_config": a.model_config,
        "device": a.device,
        "ref_cache": a.ref_cache,
        "batch_size": a.batch_size,
        "steps": a.steps,
        "warmup": a.warmup,
        "rounds": a.rounds,
        "gradient_checkpointing": a.gradient_checkpointing,
        "shared_prompt": a.shared_prompt,
        "tiles_per_image": [4, 5, 7, 6],
        "image_size": 448,
        "torch_threads": _threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_during_runs": sorted(
            round(x.get("load_avg_1m", float("nan")), 1) for v in runs.values() for x in v
        ),
        "precompute_ref_s": None if precompute_s is None else round(precompute_s, 2),
        "params": _params(work),
        "vision_to_llm_forward_flops": round(split[0] / split[1], 2),
    }
    print(json.dumps(result))
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _params(work: Path) -> dict[str, int]:
    import torch
    from transformers import AutoConfig, InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(AutoConfig.from_pretrained(work / "model"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "vision": count(model.model.vision_tower),
        "projector": count(model.model.multi_modal_projector),
        "llm": count(model.model.language_model),
    }


if __name__ == "__main__":
    sys.exit(main())
