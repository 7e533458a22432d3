"""Greedy, batched answers to benchmark questions with the training template, across ranks.

Each question becomes exactly what training feeds the model (``mpo.data``: InternVL tiling with the
run's tile budget, the checkpoint's chat template and system prompt, ``<image>`` spans), then a
batch of questions is left-padded and decoded greedily until the template's end-of-turn token.
Under several processes, question ``i`` belongs to rank ``i % world``; every rank runs the same
number of ``generate`` calls (a rank short of questions repeats one and drops its answer),
because under ZeRO-3 each forward gathers parameter shards from every rank (``synced_gpus``, as
``SampleGenerationCallback`` does), and the answers are gathered on every rank afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpo.data.template import IMAGE_PLACEHOLDER, TemplateEncoder, expand_image_placeholders
from mpo.data.tiling import VisionSpec, per_image_budget, tile_image
from mpo.eval import (
    MC_PROMPT,
    OPEN_PROMPT,
    Benchmark,
    Question,
    accuracy,
    answer_rows,
    build_prompt,
    decode_image,
    image_bytes,
    read_benchmark,
    score,
)
from mpo.repetition import Generation, hit_limit, summarize


@dataclass(frozen=True)
class Answer:
    """One generated answer: text (special tokens stripped), tokens used, ran out of tokens."""

    text: str
    num_tokens: int
    hit_limit: bool


@dataclass
class EvalSettings:
    """How questions become prompts and answers (the run's data settings by default)."""

    max_new_tokens: int = 32
    batch_size: int = 8
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    mc_prompt: str = MC_PROMPT
    open_prompt: str = OPEN_PROMPT


class BenchmarkRunner:
    """Encodes benchmark questions with the training template and answers them greedily.

    Args:
        tokenizer: the checkpoint's tokenizer.
        vision: tile size and tokens per tile.
        encoder: the training template (``TemplateEncoder``: template and system prompt).
        settings: generation and tiling settings.
    """

    def __init__(self, tokenizer, vision: VisionSpec, encoder: TemplateEncoder, settings: EvalSettings):
        self.tokenizer = tokenizer
        self.vision = vision
        self.encoder = encoder
        self.settings = settings

    def encode(self, bench: Benchmark, q: Question) -> tuple[list[int], torch.Tensor | None]:
        """Prompt ids ``(P,)`` ending with the assistant prefix, and tiles ``(tiles, 3, S, S)`` or None."""
        s = self.settings
        text = build_prompt(q, s.mc_prompt, s.open_prompt)
        n_images = len(q.images or [])
        if q.image_kind == "none" or n_images == 0:
            return self.encoder.generation_prefix(text), None
        budget = per_image_budget(s.max_dynamic_patch, n_images)
        tiles = []
        for k in range(n_images):
            image = decode_image(image_bytes(q, k, str(bench.path)), f"{bench.path}:{q.line}: image {k}")
            tiles.append(
                tile_image(
                    image, budget, self.vision.image_size, min(s.min_dynamic_patch, budget), s.use_thumbnail
                )
            )
        if text.count(IMAGE_PLACEHOLDER) != n_images:
            text = f"{IMAGE_PLACEHOLDER}\n" * n_images + text.replace(IMAGE_PLACEHOLDER, "")
        expanded = expand_image_placeholders(text, [t.shape[0] * self.vision.tokens_per_tile for t in tiles])
        return self.encoder.generation_prefix(expanded), torch.cat(tiles)

    def generate(
        self, model, prompts: list[tuple[list[int], torch.Tensor | None]], synced: bool = False
    ) -> list[Answer]:
        """Greedy answers to a batch of encoded prompts (left-padded into one ``generate`` call)."""
        return generate_batch(
            model, self.tokenizer, self.encoder.eos_id, prompts, self.settings.max_new_tokens, synced
        )

    def _stand_in(self) -> tuple[list[int], torch.Tensor]:
        """A one-tile blank-image prompt whose answer is dropped (keeps ZeRO-3 ranks in step)."""
        size = self.vision.image_size
        text = expand_image_placeholders(IMAGE_PLACEHOLDER, [self.vision.tokens_per_tile])
        return self.encoder.generation_prefix(text), torch.zeros(1, 3, size, size)

    def answer(
        self, model, bench: Benchmark, rank: int = 0, world: int = 1, synced: bool = False
    ) -> list[Answer]:
        """Every question's answer, in file order, on every rank.

        Rank ``r`` answers questions ``r, r + world, ...`` (their images are the ones
        ``read_benchmark`` kept on it); with ``synced`` (ZeRO-3) every rank makes the same number of
        ``generate`` calls. The model's train/eval mode is restored afterwards.
        """
        mine = list(range(rank, len(bench.questions), world))
        batch = self.settings.batch_size
        calls = (
            math.ceil(math.ceil(len(bench.questions) / world) / batch)
            if synced
            else math.ceil(len(mine) / batch)
        )
        was_training = model.training
        model.eval()
        local: list[tuple[int, Answer]] = []
        try:
            for c in range(calls):
                chunk = mine[c * batch : (c + 1) * batch]
                # A rank out of questions still joins every forward (ZeRO-3) with a stand-in.
                prompts = [self.encode(bench, bench.questions[i]) for i in chunk] or [self._stand_in()]
                if synced and all(t is None for _, t in prompts):
                    # Every rank must run the vision tower in every call, whatever its questions.
                    prompts.append(self._stand_in())
                answers = self.generate(model, prompts, synced)
                local += list(zip(chunk, answers))
        finally:
            model.train(was_training)
        return gather_answers(local, len(bench.questions), world)


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    eos_id: int,
    prompts: list[tuple[list[int], torch.Tensor | None]],
    max_new_tokens: int,
    synced: bool = False,
    **sampling: Any,
) -> list[Answer]:
    """Answers to a batch of encoded prompts, left-padded into one ``generate`` call.

    Args:
        eos_id: the template's end-of-turn token, where an answer stops.
        prompts: ``(prompt ids, tiles (tiles, 3, S, S) or None)`` per row.
        synced: ZeRO-3 (every rank runs every forward).
        sampling: ``do_sample``, ``temperature``, ``top_p``... for ``generate``; none: greedy.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad = tokenizer.pad_token_id
    width = max(len(ids) for ids, _ in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (ids, _) in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    tiles = [t for _, t in prompts if t is not None]
    if tiles:  # image features fill <IMG_CONTEXT> positions in batch order, as tiles are concatenated
        kwargs["pixel_values"] = torch.cat(tiles).to(device=device, dtype=dtype)
    out = model.generate(
        **kwargs,
        max_new_tokens=max_new_tokens,
        do_sample=sampling.pop("do_sample", False),
        eos_token_id=eos_id,
        pad_token_id=pad,
        synced_gpus=synced,
        **sampling,
    )
    answers = []
    for row in out[:, width:].tolist():
        used = row[: row.index(eos_id) + 1] if eos_id in row else row[:max_new_tokens]
        text_ids = used[:-1] if used and used[-1] == eos_id else used
        answers.append(
            Answer(
                tokenizer.decode(text_ids, skip_special_tokens=True),
                len(used),
                hit_limit(used, max_new_tokens, eos_id),
            )
        )
    return answers


def gather_answers(local: list[tuple[int, Answer]], total: int, world: int) -> list[Answer]:
    """Every rank's ``(question number, answer)`` pairs, merged in question order on every rank."""
    parts = [local]
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world
        dist.all_gather_object(parts, local)
    merged = dict(pair for part in parts for pair in part)
    missing = [i for i in range(total) if i not in merged]
    if missing:
        raise RuntimeError(f"benchmark answers missing for questions {missing[:5]} after gathering")
    return [merged[i] for i in range(total)]


def evaluate(
    runner: BenchmarkRunner, model, bench: Benchmark, rank: int = 0, world: int = 1, synced: bool = False
):
    """(metrics, per-question rows) for one benchmark: accuracy, per category, and repetition."""
    answers = runner.answer(model, bench, rank, world, synced)
    scored = [score(q, a.text) for q, a in zip(bench.questions, answers)]
    metrics = accuracy(bench.questions, scored)
    metrics |= summarize(Generation(a.text, a.hit_limit) for a in answers)
    return metrics, answer_rows(bench, answers, scored)


def evaluate_model_dir(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``mpo eval`` (``mpo.model.cli.cmd_eval``): load the model once, answer every benchmark, write
    ``--out`` if asked."""
    from mpo.model.export import load_merged
    from mpo.model.loading import check_model_path, load_tokenizer

    check_model_path(args.model)
    benches = [read_benchmark(b, limit=args.limit) for b in args.benchmark]
    model, tok_src = load_merged(args.model, torch_dtype=args.torch_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = load_tokenizer(tok_src)
    settings = EvalSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_dynamic_patch=args.max_dynamic_patch,
        mc_prompt=args.mc_prompt,
        open_prompt=args.open_prompt,
    )
    encoder = TemplateEncoder(tokenizer, args.system_message, args.template)
    runner = BenchmarkRunner(tokenizer, VisionSpec.from_config(model.config), encoder, settings)
    results, rows = [], []
    for bench in benches:
        metrics, bench_rows = evaluate(runner, model, bench)
        results.append({"name": bench.name, "n": len(bench.questions), "metrics": metrics})
        rows += bench_rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return results
