"""``mpo pairs sample``: N sampled answers per prompt from the configured model, resumable, over ranks.

Each prompt becomes exactly what training feeds the model (``PairEncoder.encode_prompt``: the
run's tiling and tile budget, chat template and system prompt), so the answers are the policy's own
answers to the training prompts. Prompts are cut into fixed chunks of ``batch_size`` in file order;
chunk ``c`` belongs to rank ``c % world`` and is answered in one ``generate`` call (each prompt
repeated ``num_samples`` times, left-padded) after seeding torch with ``(seed, c)``. The samples
therefore depend on the seed, the chunking and the model, not on which rank ran a chunk or on
how often the run was interrupted: a resumed run, or one over another number of ranks, gives the
same answers (on the same hardware and kernels). Output: ``mpo.construct.store``.

Ranks need no process group: each loads the model (data parallel, on ``cuda:LOCAL_RANK`` when
there is a GPU), answers its chunks and appends to its own shard. Start it with ``torchrun`` or
``deepspeed`` as training is started; ``mpo pairs build`` reads every shard.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpo.construct.prompts import Prompt, read_prompts
from mpo.construct.store import append_lines, check_manifest, drop_torn_tail, read_shards, shard_path
from mpo.data.pairs import PairEncoder, SampleError
from mpo.data.tiling import VisionSpec
from mpo.eval_model import Answer, generate_batch


@dataclass(frozen=True)
class SampleSettings:
    """How answers are sampled (``mpo pairs sample`` flags)."""

    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (transformers' generate would otherwise apply its default of 50)
    max_new_tokens: int = 512
    batch_size: int = 4  # prompts per generate call (rows: batch_size x num_samples)
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.num_samples < 1:
            out.append(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.temperature < 0:
            out.append(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            out.append(f"--top-k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            out.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            out.append(f"--batch-size must be at least 1, got {self.batch_size}")
        return out


def chunk_seed(seed: int, chunk: int) -> int:
    """The torch seed of one chunk: a hash of ``(seed, chunk)`` (no two pairs share one by accident)."""
    digest = hashlib.sha256(f"{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Generator:
    """transformers ``generate`` over encoded prompts, ``n`` sampled rows per prompt."""

    def __init__(self, model, tokenizer, eos_id: int):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = eos_id

    def sample(
        self,
        prompts: list[tuple[list[int], torch.Tensor | None]],
        settings: SampleSettings,
        seed: int,
        n: int | None = None,
    ) -> list[list[Answer]]:
        """``n`` (default ``settings.num_samples``) answers per prompt, drawn after seeding with ``seed``.

        Args:
            prompts: ``(prompt ids, tiles (tiles, 3, S, S) or None)`` each.

        Returns:
            Per prompt, its ``n`` answers in row order.
        """
        n = n or settings.num_samples
        rows = [p for p in prompts for _ in range(n)]  # tiles repeated too: features fill rows in order
        torch.manual_seed(seed)
        sampling: dict[str, Any] = {"do_sample": settings.temperature > 0}
        if settings.temperature > 0:
            sampling |= {
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "top_k": settings.top_k,
            }
        was_training = self.model.training
        self.model.eval()
        try:
            answers = generate_batch(
                self.model, self.tokenizer, self.eos_id, rows, settings.max_new_tokens, **sampling
            )
        finally:
            self.model.train(was_training)
        return [answers[k * n : (k + 1) * n] for k in range(len(prompts))]


def load_generator(cfg) -> tuple[Generator, PairEncoder]:
    """The configured model (LoRA folders merged) on this rank's device, and the training encoder."""
    from mpo.model.export import load_merged
    from mpo.model.loading import check_model_path, load_tokenizer

    check_model_path(cfg.model.path)
    model, tok_src = load_merged(cfg.model.path, torch_dtype=cfg.model.torch_dtype)
    if torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    tokenizer = load_tokenizer(tok_src)
    encoder = PairEncoder(tokenizer, VisionSpec.from_config(model.config), cfg.data)
    return Generator(model, tokenizer, encoder.template.eos_id), encoder


def manifest_for(cfg, prompts_path: str | Path, num_prompts: int, settings: SampleSettings) -> dict[str, Any]:
    """What the samples depend on; a folder only takes more samples made with the same."""
    d = cfg.data
    return {
        "model": str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).exists() else cfg.model.path,
        "torch_dtype": cfg.model.torch_dtype,
        "prompts": str(Path(prompts_path).resolve()),
        "num_prompts": num_prompts,
        "template": d.template,
        "system_message": d.system_message,
        "max_dynamic_patch": d.max_dynamic_patch,
        "min_dynamic_patch": d.min_dynamic_patch,
        "use_thumbnail": d.use_thumbnail,
        "backend": "transformers",
        **asdict(settings),
    }


def prompt_row(prompt: Prompt, index: int, chunk: int) -> dict[str, Any]:
    """A shard line's prompt part (``mpo.construct.store``)."""
    return {
        "key": prompt.key,
        "index": index,
        "dataset": prompt.spec.name,
        "line": prompt.line,
        "chunk": chunk,
        "root": str(prompt.spec.root.resolve()),
        "max_dynamic_patch": prompt.spec.max_dynamic_patch,
        "record": prompt.record,
    }


def sample_chunk(
    generator: Generator,
    encoder: PairEncoder,
    chunk: list[tuple[int, Prompt]],
    c: int,
    settings: SampleSettings,
    on_bad_sample: str,
) -> list[dict[str, Any]]:
    """Shard lines for one chunk ``c`` of ``(prompt index, prompt)``: every prompt's, done or not,
    because the random draws depend on the whole chunk."""
    encoded, rows = [], []
    for index, prompt in chunk:
        row = prompt_row(prompt, index, c)
        try:
            enc = encoder.encode_prompt(prompt.spec, prompt.line, prompt.record, settings.max_new_tokens)
        except SampleError as exc:
            if on_bad_sample == "error":
                raise
            rows.append(row | {"error": str(exc), "reason": exc.reason})
            continue
        encoded.append((enc["input_ids"], enc["pixel_values"]))
        rows.append(row)
    answers = iter(generator.sample(encoded, settings, chunk_seed(settings.seed, c)) if encoded else [])
    for row in rows:
        if "error" not in row:
            row["samples"] = [
                {"text": a.text, "num_tokens": a.num_tokens, "hit_limit": a.hit_limit} for a in next(answers)
            ]
    return rows


def run_sampling(
    cfg,
    prompts_path: str | Path,
    out_dir: str | Path,
    settings: SampleSettings,
    rank: int = 0,
    world: int = 1,
    max_chunks: int | None = None,
    log=print,
) -> dict[str, int]:
    """Sample this rank's chunks that are not done yet into ``out_dir``.

    Args:
        cfg: the experiment config (``model`` and ``data`` sections are used).
        max_chunks: stop after this many chunks (None: all); a later run resumes.
        log: progress lines (rank 0's are printed by the CLI).

    Returns:
        ``prompts`` (in the file), ``done_before`` (prompts already in the folder), ``sampled``
        (prompts written now, this rank), ``skipped`` (of those, not encodable), ``chunks``.

    Raises:
        DataError: a bad prompts file, or a folder holding samples made with other settings.
    """
    out = Path(out_dir)
    prompts = read_prompts(prompts_path, cfg.data.follow_symlinks_outside_root)
    out.mkdir(parents=True, exist_ok=True)
    check_manifest(out, manifest_for(cfg, prompts_path, len(prompts), settings), write=rank == 0)
    own = shard_path(out, rank)
    drop_torn_tail(own)
    done = set(read_shards(out, keys_only=True))
    b = settings.batch_size
    chunks = [list(enumerate(prompts))[i : i + b] for i in range(0, len(prompts), b)]
    todo = [c for c in range(rank, len(chunks), world) if any(p.key not in done for _, p in chunks[c])]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    summary = {"prompts": len(prompts), "done_before": len(done), "sampled": 0, "skipped": 0, "chunks": 0}
    if not todo:
        return summary
    generator, encoder = load_generator(cfg)
    every = max(1, len(todo) // 10)
    for k, c in enumerate(todo, start=1):
        rows = sample_chunk(generator, encoder, chunks[c], c, settings, cfg.data.on_bad_sample)
        fresh = [r for r in rows if r["key"] not in done]
        append_lines(own, fresh)
        summary["sampled"] += len(fresh)
        summary["skipped"] += sum("error" in r for r in fresh)
        summary["chunks"] += 1
        if k % every == 0 or k == len(todo):
            log(f"rank {rank}: {k}/{len(todo)} chunks, {summary['sampled']} prompts sampled")
    return summary
