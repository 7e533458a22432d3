"""``mpo pairs build --dropout-ntp``: rejected answers written without looking at the image.

DropoutNTP (Wang et al. 2024, arXiv:2411.10442, §3.1, for prompts without one checkable answer):
the model's own answer is the chosen one; it is cut at ``cut_ratio`` of its tokens and the model
continues it *without the image* (every ``<image>``/``<video>`` placeholder dropped from the prompt,
no pixels), and that continuation, after the same cut, is the rejected answer: it reads like the
chosen one but what it says about the image is made up.

Chosen answers are a prompt's distinct sampled answers that did not run into the token limit; for
a prompt with ``answer_gt`` only those the judge finds right. The continuation is sampled with
the samples' own settings (temperature, top-p, top-k, new tokens), in batches seeded as sampling is
(``mpo.construct.sample.chunk_seed``), so the same samples and seed give the same pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo.construct.build import DatasetReport, pair_record, sorted_rows, unique_texts, write_pairs
from mpo.construct.judge import JudgeFn, as_verdict
from mpo.construct.sample import Generator, SampleSettings, chunk_seed, load_generator
from mpo.construct.store import read_manifest, read_shards
from mpo.data.template import TemplateEncoder

_MEDIA = re.compile(r"<(?:image|video)>\n?")


@dataclass(frozen=True)
class DropoutSettings:
    cut_ratio: float = 0.5
    max_pairs_per_prompt: int = 1


def without_media(text: str) -> str:
    """The text with its ``<image>``/``<video>`` placeholders (and the newline after each) removed."""
    return _MEDIA.sub("", text)


def blind_prompt(template: TemplateEncoder, record: dict[str, Any]) -> list[int]:
    """The prompt's ids, ending with the assistant prefix, with no image or video in it."""
    history = [(without_media(u), a) for u, a in record.get("history") or []]
    return template.generation_prefix(without_media(record["question"]), history, record.get("system"))


def cut_answer(template: TemplateEncoder, answer: str, ratio: float) -> list[int] | None:
    """The first ``floor(ratio * n)`` of the answer's ``n`` tokens; None when that keeps none or all."""
    ids = template.tokenizer(answer, add_special_tokens=False)["input_ids"]
    keep = int(len(ids) * ratio)
    return ids[:keep] if 0 < keep < len(ids) else None


def chosen_answers(
    row: dict[str, Any], judge: JudgeFn, report: DatasetReport
) -> tuple[list[str], str | None]:
    """The answers a prompt may use as chosen, or the reason it has none."""
    if "samples" not in row:
        return [], f"not_sampled:{row.get('reason', 'error')}"
    report.samples += len(row["samples"])
    finished = [s for s in row["samples"] if not s["hit_limit"]]
    texts = unique_texts(finished, report)
    if not texts:
        return [], "all_hit_limit" if row["samples"] else "no_samples"
    if row["record"].get("answer_gt") is None:
        return texts, None
    right = []
    for text in texts:
        verdict = as_verdict(judge(row["record"], text), row["key"])
        report.extraction_failures += verdict.extracted is None
        report.correct += verdict.correct
        report.wrong += not verdict.correct
        if verdict.correct:
            right.append(text)
    return right, None if right else "no_right_answer"


def build_dropout_ntp(
    cfg,
    samples_dir: Path,
    out_dir: Path,
    settings: DropoutSettings,
    judge: JudgeFn,
    generator: Generator | None = None,
) -> dict[str, Any]:
    """DropoutNTP pairs for every sampled prompt; writes them as ``mpo.construct.build`` does.

    Args:
        cfg: the experiment config whose model continues the cut answers (``model``, ``data``).
        generator: the model to continue with (default: loaded from ``cfg``).

    Returns:
        The report (``mpo.construct.build.write_pairs``).
    """
    manifest = read_manifest(samples_dir)
    sampling = SampleSettings(
        temperature=manifest["temperature"],
        top_p=manifest["top_p"],
        top_k=manifest["top_k"],
        max_new_tokens=manifest["max_new_tokens"],
        batch_size=manifest["batch_size"],
        seed=manifest["seed"],
    )
    if generator is None:
        generator, encoder = load_generator(cfg)
        template = encoder.template
    else:
        template = TemplateEncoder(generator.tokenizer, cfg.data.system_message, cfg.data.template)
    rows = sorted_rows(read_shards(samples_dir))
    reports: dict[str, DatasetReport] = {}
    reasons: dict[str, str] = {}
    jobs: list[tuple[dict[str, Any], str, list[int]]] = []  # (row, chosen, kept ids)
    for row in rows:
        report = reports.setdefault(row["dataset"], DatasetReport())
        texts, reason = chosen_answers(row, judge, report)
        cuts = [(t, cut_answer(template, t, settings.cut_ratio)) for t in texts]
        cuts = [(t, ids) for t, ids in cuts if ids is not None][: settings.max_pairs_per_prompt]
        if reason is None and not cuts:
            reason = "answer_too_short"
        if reason is not None:
            reasons[row["key"]] = reason
        jobs += [(row, text, ids) for text, ids in cuts]
    made: dict[str, list[dict[str, Any]]] = {}
    b = sampling.batch_size
    for k in range(0, len(jobs), b):
        batch = jobs[k : k + b]
        prompts = [(blind_prompt(template, row["record"]) + ids, None) for row, _, ids in batch]
        answers = generator.sample(prompts, sampling, chunk_seed(sampling.seed, k // b), n=1)
        for (row, chosen, ids), (answer,) in zip(batch, answers):
            rejected = (template.tokenizer.decode(ids, skip_special_tokens=True) + answer.text).strip()
            if not rejected or rejected == chosen.strip():
                continue  # the model wrote the same without the image: no pair from this answer
            made.setdefault(row["key"], []).append(pair_record(row, chosen, rejected))

    def make_pairs(row: dict[str, Any], report: DatasetReport) -> list[dict[str, Any]]:
        report.prompts += 1
        pairs = made.get(row["key"], [])
        if pairs:
            report.pairs += len(pairs)
            report.prompts_with_pairs += 1
        else:
            report.no_pair[reasons.get(row["key"], "continuation_equals_chosen")] += 1
        return pairs

    return write_pairs(out_dir, rows, make_pairs, reports)
