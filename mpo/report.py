"""``mpo report RUN_DIR``: plots, a verdict on common failure signs, and sample generations.

Reads ``RUN_DIR/metrics.jsonl`` (one JSON line per logging step, written by
``MetricsFileCallback``), ``samples.jsonl`` (``SampleGenerationCallback``), ``benchmarks.jsonl``
(``BenchmarkEvalCallback``: one plot per benchmark, and the repetition alarm of
``mpo.repetition`` against the first evaluation, with the worst answer shown), and ``config.yaml`` /
``run_info.json`` / ``summary.json`` when present; writes ``RUN_DIR/report/`` with one PNG per plot,
``summary.png`` (the six main panels) and ``report.html`` (self-contained: images inlined as base64).

The verdict checks follow what preference-training users report as bugs (see
docs/reading-metrics.md): loss 0 from the start, an initial loss far from
``w_p·ln2 + w_q·2ln2 + w_g·NLL`` (0.832 + NLL with the paper's weights, Wang et al. 2024 §3.2),
accuracy stuck at 0.5, margins exploding, and chosen log-probs falling fast while the rejected ones
fall faster (the "collapse" pattern described for DPO by Pal et al. 2024, "Smaug", §3, and the
reason MPO keeps the SFT term).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpo.config import LossConfig
from mpo.repetition import METRICS as REPETITION_METRICS
from mpo.repetition import rises, worst

LN2 = math.log(2.0)
REPORT_DIR = "report"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
BENCHMARKS_FILE = "benchmarks.jsonl"
GENERATION_PREFIXES = ("bench/", "samples/")  # rows of BenchmarkEvalCallback / SampleGenerationCallback


# ---- reading ---------------------------------------------------------------------------------
@dataclass
class RunMetrics:
    """Logged rows of one run, split into training logs and evaluation logs."""

    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    # benchmark and sampled-generation rows (``bench/...``, ``samples/...`` keys)
    generation: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)  # 1-based line numbers that were not JSON objects
    samples: list[dict[str, Any]] = field(default_factory=list)  # samples.jsonl rows
    answers: list[dict[str, Any]] = field(default_factory=list)  # benchmarks.jsonl rows

    def series(self, key: str, split: str = "train") -> tuple[list[float], list[float]]:
        """(steps, values) of ``key`` (``eval`` rows use the ``eval_`` prefix; ``generation`` rows
        hold the benchmark and sample keys), non-finite kept as nan."""
        rows = {"train": self.train, "eval": self.eval, "generation": self.generation}[split]
        name = f"eval_{key}" if split == "eval" else key
        steps, values = [], []
        for r in rows:
            if name in r:
                v = _as_float(r[name])
                if v is not None:
                    steps.append(float(r.get("step", len(steps))))
                    values.append(v)
        return steps, values

    def finite(self, key: str, split: str = "train") -> list[float]:
        return [v for v in self.series(key, split)[1] if math.isfinite(v)]


def _as_float(v: Any) -> float | None:
    # MetricsFileCallback writes non-finite numbers as the strings "nan" / "inf" / "-inf".
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(v)
    return None


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse ``metrics.jsonl``; malformed lines are skipped and their line numbers kept."""
    out = RunMetrics()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                out.bad_lines.append(line_no)
                continue
            if not isinstance(row, dict):
                out.bad_lines.append(line_no)
            elif "loss" in row:
                out.train.append(row)
            elif "eval_loss" in row:
                out.eval.append(row)
            elif any(k.startswith(GENERATION_PREFIXES) for k in row):
                out.generation.append(row)
            # anything else (the end-of-training summary: train_runtime, ...) is not a curve
    return out


def read_samples(path: str | Path, key: str = "generated") -> list[dict[str, Any]]:
    """Rows of ``samples.jsonl`` (or, ``key="prediction"``, ``benchmarks.jsonl``); empty when the
    file does not exist; malformed lines skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and key in row:
            rows.append(row)
    return rows


def expected_initial_preference(s: LossConfig) -> float:
    """``w_p·ln2 + w_q·2ln2``: the non-NLL part of the loss when π = πref and δ = 0 (sigmoid DPO)."""
    return s.preference_weight * LN2 + s.quality_weight * 2 * LN2


def read_loss_settings(run_dir: Path) -> LossConfig:
    """The ``loss`` section of the run's ``config.yaml`` (the paper's defaults without one, or
    when it cannot be read: the report still draws its plots)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return LossConfig()
    import yaml

    from mpo.config import ConfigError, load_section

    try:
        return load_section("loss", (yaml.safe_load(path.read_text()) or {}).get("loss") or {}, str(path))
    except (ConfigError, yaml.YAMLError, AttributeError):
        return LossConfig()


# ---- verdict ---------------------------------------------------------------------------------
@dataclass
class Finding:
    """One verdict line: ``level`` is ``bad``, ``warn`` or ``ok``."""

    level: str
    check: str  # a stable id, e.g. "collapse"
    title: str
    detail: str
    advice: str = ""


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _tail(xs: list[float], frac: float = 0.25) -> list[float]:
    """The last ``frac`` of a series (at least one value)."""
    return xs[-max(1, int(round(len(xs) * frac))) :] if xs else []


def check_nonfinite(m: RunMetrics, s: LossConfig) -> list[Finding]:
    steps, loss = m.series("loss")
    for st, v in zip(steps, loss):
        if not math.isfinite(v):
            return [
                Finding(
                    "bad",
                    "nonfinite",
                    f"Loss became {v} at step {int(st)}",
                    "The optimiser diverged or a batch produced inf log-probs.",
                    "Lower the learning rate, keep max_grad_norm at 1.0, prefer bf16 over fp16, and check the "
                    "batch at that step (empty responses, prompts cut by max_length).",
                )
            ]
    return []


def check_loss_zero(m: RunMetrics, s: LossConfig) -> list[Finding]:
    loss = m.finite("loss")
    if not loss or abs(loss[0]) > 1e-4:
        return []
    chosen = m.finite("logps/chosen")
    no_tokens = bool(chosen) and all(abs(v) < 1e-9 for v in chosen[:3])
    return [
        Finding(
            "bad",
            "loss_zero",
            "Loss is 0 from the start",
            f"The first logged loss is {loss[0]:.3g}. With π = πref the MPO loss is at least "
            f"{expected_initial_preference(s):.3f} (+ NLL), so 0 means no term is contributing"
            + ("; logps/chosen is exactly 0, so no response token is trained." if no_tokens else "."),
            "Check that the loss weights are not all 0, that responses survive max_length truncation "
            "(labels not all -100), and that chosen != rejected.",
        )
    ]


def check_initial_loss(m: RunMetrics, s: LossConfig) -> list[Finding]:
    if s.preference_type != "sigmoid" or not m.train:
        return []
    first = m.train[0]
    loss, sft = _as_float(first.get("loss")), _as_float(first.get("loss/sft"))
    if loss is None or sft is None or not (math.isfinite(loss) and math.isfinite(sft)) or abs(loss) < 1e-4:
        return []
    expected = expected_initial_preference(s) + s.generation_weight * sft
    step = int(first.get("step", 0))
    if abs(loss - expected) <= 0.1 + 0.02 * abs(expected):
        return [
            Finding(
                "ok",
                "initial_loss",
                f"Initial loss {loss:.3f} is as expected",
                f"{expected_initial_preference(s):.3f} (preference + quality at π = πref) + "
                f"{s.generation_weight:g}×NLL {sft:.3f} = {expected:.3f} (first log, step {step}). A start "
                "of 1.5-2 on a real model is normal: it is mostly the SFT term.",
            )
        ]
    dpo = _as_float(first.get("loss/dpo"))
    why = (
        f"loss/dpo starts at {dpo:.3f} instead of ln2 = {LN2:.3f}: the policy and the reference disagree at step 0"
        if dpo is not None and abs(dpo - LN2) > 0.05
        else "the first log averages several steps that already moved the loss"
    )
    return [
        Finding(
            "warn",
            "initial_loss",
            f"Initial loss {loss:.3f} is far from the expected {expected:.3f}",
            f"Expected {expected_initial_preference(s):.3f} + {s.generation_weight:g}×NLL {sft:.3f} at step 0; {why}.",
            "Make model.ref_path the same checkpoint as model.path (or rebuild the reference cache), keep "
            "dropout off in the reference, and use logging_steps=1 to see the true step-0 loss.",
        )
    ]


def check_accuracy_stuck(m: RunMetrics, s: LossConfig) -> list[Finding]:
    acc = m.finite("rewards/accuracies")
    eval_acc = m.finite("rewards/accuracies", "eval")
    if len(acc) < 4:
        return []
    late = _mean(acc[len(acc) // 2 :])
    late_eval = eval_acc[-1] if len(eval_acc) >= 2 else None
    if not (0.42 <= late <= 0.58) and not (late_eval is not None and 0.42 <= late_eval <= 0.58):
        return []
    margins = m.finite("rewards/margins")
    return [
        Finding(
            "warn",
            "accuracy_stuck",
            "Preference accuracy is stuck near 0.5",
            f"Mean train accuracy over the second half is {late:.3f}"
            + (f", last eval accuracy {late_eval:.3f}" if late_eval is not None else "")
            + (f"; the last margin is {margins[-1]:.3g}" if margins else "")
            + ". The policy is not separating chosen from rejected answers.",
            "Raise the learning rate (the official full fine-tune uses 1e-6; LoRA needs 1e-5 to 1e-4), train "
            "longer, check that chosen and rejected are not swapped or near-identical, and that β is not tiny.",
        )
    ]


def check_margins_exploding(m: RunMetrics, s: LossConfig, limit: float = 10.0) -> list[Finding]:
    margins = m.finite("rewards/margins")
    if len(margins) < 2:
        return []
    late = max(_tail(margins))
    if late <= limit:
        return []
    return [
        Finding(
            "warn",
            "margins_exploding",
            "Reward margins are exploding",
            f"The margin β·(Δchosen − Δrejected) reached {late:.3g} (from {margins[0]:.3g}); healthy runs "
            f"stay within a few units (β = {s.beta:g}). The policy is over-optimising the preference term.",
            "Lower the learning rate or train fewer steps, raise β (a stronger pull to the reference), and "
            "keep loss.generation_weight at 1.0.",
        )
    ]


def check_collapse(m: RunMetrics, s: LossConfig) -> list[Finding]:
    chosen = m.finite("logps/chosen")
    sft = m.finite("loss/sft")
    rejected = m.finite("logps/rejected")
    if len(chosen) < 3:
        return []
    c0, c1 = chosen[0], _mean(_tail(chosen))
    # Summed log-probs: a drop of more than a third of the starting magnitude is a large per-token change.
    chosen_falling = c1 < c0 - max(1.0, abs(c0) / 3)
    nll_rising = len(sft) >= 3 and _mean(_tail(sft)) > 1.5 * sft[0] + 0.05
    if not (chosen_falling or nll_rising):
        return []
    parts = [f"logps/chosen went from {c0:.3g} to {c1:.3g}"]
    if rejected:
        parts.append(f"logps/rejected from {rejected[0]:.3g} to {_mean(_tail(rejected)):.3g}")
    if sft:
        parts.append(f"chosen NLL per token from {sft[0]:.3g} to {_mean(_tail(sft)):.3g}")
    return [
        Finding(
            "bad",
            "collapse",
            "Chosen log-probs are falling fast (collapse pattern)",
            "; ".join(parts) + ". The model widens the margin by making both answers unlikely, the rejected "
            "one faster; generations usually degrade (repetition, gibberish) even though accuracy looks good.",
            "Lower the learning rate, keep or raise loss.generation_weight (the SFT term is what holds the "
            "chosen answers up), raise β, train fewer steps, and check the chosen answers come from a model "
            "close to yours (very high initial NLL means off-distribution pairs).",
        )
    ]


def check_overfit(m: RunMetrics, s: LossConfig) -> list[Finding]:
    acc = m.finite("rewards/accuracies")
    eval_acc = m.finite("rewards/accuracies", "eval")
    if len(acc) < 2 or not eval_acc:
        return []
    gap = _mean(_tail(acc)) - eval_acc[-1]
    if gap <= 0.2:
        return []
    return [
        Finding(
            "warn",
            "overfit",
            "Train accuracy is far above held-out accuracy",
            f"Train {_mean(_tail(acc)):.3f} vs eval {eval_acc[-1]:.3f}: the policy memorises the training pairs.",
            "Train fewer steps/epochs, add data (repeat_time), or lower the learning rate.",
        )
    ]


def check_delta_reset(m: RunMetrics, s: LossConfig) -> list[Finding]:
    steps, delta = m.series("bco/delta")
    for i in range(1, len(delta)):
        if abs(delta[i - 1]) > 1e-3 and abs(delta[i]) < 1e-9:
            return [
                Finding(
                    "warn",
                    "delta_reset",
                    f"δ fell back to 0 at step {int(steps[i])}",
                    "δ is the running mean of all rewards and should move smoothly; a jump to 0 means it was not "
                    "restored (e.g. resuming from a checkpoint without mpo_state.json).",
                    "Resume from a complete checkpoint written by internvl-mpo.",
                )
            ]
    return []


def check_no_eval(m: RunMetrics, s: LossConfig) -> list[Finding]:
    if m.eval or not m.train:
        return []
    return [
        Finding(
            "ok",
            "no_eval",
            "No held-out evaluation was logged",
            "Without eval curves over-fitting cannot be told apart from learning.",
            "Set data.eval_meta_path and training.eval_strategy=steps with eval_steps.",
        )
    ]


def check_steps_go_back(m: RunMetrics, s: LossConfig) -> list[Finding]:
    steps = [r.get("step") for r in m.train]
    for i in range(1, len(steps)):
        if isinstance(steps[i], int) and isinstance(steps[i - 1], int) and steps[i] < steps[i - 1]:
            return [
                Finding(
                    "warn",
                    "mixed_runs",
                    "metrics.jsonl holds more than one run",
                    f"The training step goes back from {steps[i - 1]} to {steps[i]} (train record {i + 1}): "
                    "another run was written into the same output_dir, so the curves mix runs.",
                    "Give each run its own training.output_dir (internvl-mpo refuses a used one unless "
                    "training.overwrite_output_dir=true, which clears it first).",
                )
            ]
    return []


def _generation_series(m: RunMetrics, metrics: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """``bench/...`` and ``samples/...`` keys ending in one of ``metrics`` -> [(step, value), ...]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in m.generation:
        for k, v in row.items():
            value = _as_float(v)
            if k.startswith(GENERATION_PREFIXES) and k.rsplit("/", 1)[-1] in metrics and value is not None:
                out.setdefault(k, []).append((int(row.get("step", 0)), value))
    return out


def _worst_answer(m: RunMetrics, source: str, step: int) -> str:
    """The most repetitive answer ``source`` (``samples`` or ``bench/<name>``) gave at ``step``."""
    if source == "samples":
        rows, key = [r for r in m.samples if r.get("step") == step], "generated"
    else:
        name = source.split("/", 1)[1]
        rows, key = (
            [r for r in m.answers if r.get("step") == step and r.get("benchmark") == name],
            "prediction",
        )
    found = worst(rows, key)
    if found is None:
        return ""
    row, rep = found
    text = str(row.get(key, ""))
    shown = text if len(text) <= 300 else text[:300] + "…"
    where = f"prompt {row.get('prompt_id')}" if source == "samples" else f"question {row.get('index')}"
    ran_out = ", ran out of tokens" if rep.hit_limit else ""
    return f' Worst at step {step} ({where}: {rep.longest_run} copies in a row{ran_out}): "{shown}"'


def check_repetition(m: RunMetrics, s: LossConfig) -> list[Finding]:
    """Sampled generations or benchmark answers that became repetitive against the first
    evaluation (step 0 in a fresh run): more of them run out of tokens, longer repeated runs,
    lower distinct-2 (``mpo.repetition``; InternVL issues #1241, #1217)."""
    found = rises(_generation_series(m, REPETITION_METRICS))
    if not found:
        return []
    by_source: dict[str, list] = {}
    for r in found:
        by_source.setdefault(r.key.rsplit("/", 1)[0], []).append(r)
    parts = []
    for source, items in by_source.items():
        moves = ", ".join(
            f"{r.key.rsplit('/', 1)[1]} {r.first:.3g} → {r.last:.3g} (step {r.first_step} → {r.last_step})"
            for r in items
        )
        parts.append(f"{source}: {moves}.{_worst_answer(m, source, items[0].last_step)}")
    return [
        Finding(
            "warn",
            "repetition",
            "Generations became repetitive",
            " ".join(parts),
            "Lower the learning rate or train fewer steps, keep loss.generation_weight at 1.0 (the SFT term "
            "holds fluent chosen answers up), raise β, and check that the chosen answers are not themselves "
            "truncated or repetitive (a DropoutNTP-style continuation often is).",
        )
    ]


def check_benchmarks(m: RunMetrics, s: LossConfig) -> list[Finding]:
    """Benchmark accuracy from the first to the last evaluation; a fall of over 0.05 is flagged."""
    series = _generation_series(m, ("accuracy",))
    findings, moves = [], []
    for key, points in sorted(series.items()):
        if key.count("/") != 2:  # bench/<name>/accuracy, not its categories
            continue
        name = key.split("/")[1]
        (s0, v0), (s1, v1) = points[0], points[-1]
        moves.append(f"{name} {v0:.3f} → {v1:.3f} (step {s0} → {s1})")
        if len(points) >= 2 and v1 < v0 - 0.05:
            findings.append(
                Finding(
                    "warn",
                    "benchmark_drop",
                    f"Benchmark accuracy fell on {name}",
                    f"{name}: accuracy {v0:.3f} at step {s0}, {v1:.3f} at step {s1}. The preference data may "
                    "pull the model away from what the benchmark measures.",
                    "Compare with the held-out preference accuracy; lower the learning rate or train fewer "
                    "steps; mix in data closer to the benchmark's task.",
                )
            )
    if moves:
        findings.append(Finding("ok", "benchmarks", "Benchmark accuracy", "; ".join(moves) + "."))
    return findings


CHECKS = (
    check_steps_go_back,
    check_nonfinite,
    check_loss_zero,
    check_initial_loss,
    check_accuracy_stuck,
    check_margins_exploding,
    check_collapse,
    check_overfit,
    check_delta_reset,
    check_no_eval,
    check_repetition,
    check_benchmarks,
)


def diagnose(m: RunMetrics, settings: LossConfig | None = None) -> list[Finding]:
    """Every check's findings, problems first; a closing ``ok`` summary when nothing is wrong."""
    s = settings or LossConfig()
    found = [f for check in CHECKS for f in check(m, s)]
    if m.train and not any(f.level in ("bad", "warn") for f in found):
        found.append(_healthy_summary(m))
    order = {"bad": 0, "warn": 1, "ok": 2}
    return sorted(found, key=lambda f: order[f.level])


def _healthy_summary(m: RunMetrics) -> Finding:
    parts = []
    for key, name in (
        ("rewards/accuracies", "accuracy"),
        ("rewards/margins", "margin"),
        ("loss/sft", "chosen NLL"),
    ):
        xs = m.finite(key)
        if xs:
            parts.append(f"{name} {xs[0]:.3g} → {xs[-1]:.3g}")
    return Finding("ok", "healthy", "No failure signs", "; ".join(parts) + ".")


def headline(findings: list[Finding]) -> str:
    if any(f.level == "bad" for f in findings):
        return "problems found"
    if any(f.level == "warn" for f in findings):
        return "warnings"
    return "healthy"


# ---- plots -----------------------------------------------------------------------------------
@dataclass
class PlotSpec:
    name: str  # file stem
    title: str
    keys: tuple[str, ...]
    hline: float | None = None
    hline_label: str = ""
    with_eval: bool = True  # False where the eval value repeats the train one (δ, reference log-probs)
    split: str = "train"  # "generation": benchmark and sampled-generation rows


PLOTS = (
    PlotSpec("loss", "Total loss (train vs eval)", ("loss",)),
    PlotSpec("loss_dpo", "Preference loss L_p (DPO sigmoid)", ("loss/dpo",), LN2, "ln 2 (π = πref)"),
    PlotSpec("loss_bco", "Quality loss L_q (BCO pair)", ("loss/bco",), 2 * LN2, "2 ln 2 (π = πref, δ = 0)"),
    PlotSpec("loss_sft", "Generation loss L_g (chosen NLL per token)", ("loss/sft",)),
    PlotSpec("rewards", "Rewards β·(log π − log πref)", ("rewards/chosen", "rewards/rejected"), 0.0),
    PlotSpec("margins", "Reward margin (chosen − rejected)", ("rewards/margins",), 0.0),
    PlotSpec("accuracy", "Preference accuracy", ("rewards/accuracies",), 0.5, "chance"),
    PlotSpec(
        "logps",
        "Sequence log-probs",
        ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected"),
    ),
    PlotSpec("delta", "BCO δ (running mean reward)", ("bco/delta",), with_eval=False),
    PlotSpec("learning_rate", "Learning rate", ("learning_rate",)),
    PlotSpec("grad_norm", "Gradient norm", ("grad_norm",)),
    PlotSpec("throughput", "Throughput (pairs/s)", ("pairs_per_s",)),
)
SUMMARY_PANELS = ("loss", "accuracy", "margins", "rewards", "logps", "delta")


def _draw(ax, m: RunMetrics, spec: PlotSpec) -> bool:
    """Draw ``spec`` on ``ax``: train solid, eval dashed with markers; False when nothing was logged."""
    drawn = False
    for i, key in enumerate(spec.keys):
        is_ref = "ref_" in key
        # A reference curve takes its policy curve's colour, dotted.
        base = key.replace("ref_", "")
        color = f"C{spec.keys.index(base) if is_ref and base in spec.keys else i}"
        x, y = m.series(key, spec.split)
        if x:
            ax.plot(x, y, ":" if is_ref else "-", color=color, label=key, linewidth=1.4)
            drawn = True
        ex, ey = (
            m.series(key, "eval") if spec.with_eval and not is_ref and spec.split == "train" else ([], [])
        )
        if ex:
            ax.plot(ex, ey, "--o", color=color, label=f"eval {key}", markersize=4, linewidth=1.0)
            drawn = True
    if not drawn:
        return False
    if spec.hline is not None:
        ax.axhline(spec.hline, color="grey", linewidth=0.8, linestyle="-.", label=spec.hline_label or None)
    ax.set_title(spec.title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return True


def _figure(**kw):
    import matplotlib

    matplotlib.use("Agg")  # no display: report runs on training nodes and in CI
    import matplotlib.pyplot as plt

    return plt, plt.subplots(**kw)


def generation_plots(m: RunMetrics) -> list[PlotSpec]:
    """Per benchmark: its accuracy (overall and per category); and the repetition numbers of every
    benchmark and of the sampled generations (shares on one plot, longest runs on another)."""
    keys = sorted({k for row in m.generation for k in row if k.startswith(GENERATION_PREFIXES)})
    specs = []
    for name in sorted({k.split("/")[1] for k in keys if k.startswith("bench/")}):
        acc = tuple(k for k in keys if k.startswith(f"bench/{name}/accuracy"))
        specs.append(
            PlotSpec(f"bench_{name}", f"Benchmark {name}: accuracy", acc, with_eval=False, split="generation")
        )
    share = tuple(k for k in keys if k.rsplit("/", 1)[-1] in ("limit_share", "distinct2"))
    runs = tuple(k for k in keys if k.rsplit("/", 1)[-1] == "longest_run")
    if share:
        specs.append(
            PlotSpec(
                "repetition",
                "Repetition: share at the token limit, distinct-2",
                share,
                with_eval=False,
                split="generation",
            )
        )
    if runs:
        specs.append(
            PlotSpec(
                "repetition_runs",
                "Repetition: longest run of one n-gram (copies)",
                runs,
                1.0,
                "no repeat",
                False,
                "generation",
            )
        )
    return specs


def write_plots(m: RunMetrics, out_dir: Path) -> dict[str, Path]:
    """One PNG per ``PLOTS`` entry (and per benchmark / repetition plot) that has data; {name: path}."""
    written = {}
    for spec in (*PLOTS, *generation_plots(m)):
        plt, (fig, ax) = _figure(figsize=(6.4, 3.6))
        try:
            if _draw(ax, m, spec):
                fig.tight_layout()
                path = out_dir / f"{spec.name}.png"
                fig.savefig(path, dpi=90)
                written[spec.name] = path
        finally:
            plt.close(fig)
    return written


def write_summary_figure(m: RunMetrics, findings: list[Finding], path: Path, title: str) -> Path:
    """The six main panels in one figure, titled with the verdict (the README screenshot)."""
    specs = {s.name: s for s in PLOTS}
    plt, (fig, axes) = _figure(nrows=2, ncols=3, figsize=(13, 6.4))
    try:
        for ax, name in zip(axes.flat, SUMMARY_PANELS):
            if not _draw(ax, m, specs[name]):
                ax.set_axis_off()
        problems = [f.title for f in findings if f.level in ("bad", "warn")]
        verdict = headline(findings) + (": " + "; ".join(problems) if problems else "")
        fig.suptitle(f"{title}  -  verdict: {verdict}", fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=72)
    finally:
        plt.close(fig)
    return path


# ---- HTML ------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.f{border-left:5px solid #999;padding:.4em .8em;margin:.6em 0;background:#fafafa}
.bad{border-color:#c62828}.warn{border-color:#ef8f00}.ok{border-color:#2e7d32}
.lvl{font-weight:bold;text-transform:uppercase;font-size:.8em;margin-right:.5em}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid img{width:540px;max-width:100%}
img.summary{width:100%}table{border-collapse:collapse;font-size:.85em;width:100%}
td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
td.gen{white-space:pre-wrap;font-family:monospace}
pre{background:#f4f4f4;padding:.6em;overflow-x:auto;font-size:.8em}
"""


def _img(path: Path, cls: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="{cls}" alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _findings_html(findings: list[Finding]) -> str:
    out = []
    for f in findings:
        advice = f"<div><b>What to try:</b> {html.escape(f.advice)}</div>" if f.advice else ""
        out.append(
            f'<div class="f {f.level}"><span class="lvl">{f.level}</span><b>{html.escape(f.title)}</b>'
            f"<div>{html.escape(f.detail)}</div>{advice}</div>"
        )
    return "\n".join(out)


def _visible(text: str) -> str:
    """Escaped, with newlines shown (an untrained model often answers with nothing but newlines)."""
    return html.escape(text).replace("\n", "↵\n") if text else "<i>(empty)</i>"


def _samples_html(samples: list[dict[str, Any]]) -> str:
    if not samples:
        return "<p>No sample generations (set <code>training.sample_steps</code> to log some).</p>"
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for r in samples:
        by_prompt.setdefault(int(r.get("prompt_id", 0)), []).append(r)
    out = []
    for pid, rows in sorted(by_prompt.items()):
        first = rows[0]
        where = f"{first.get('split', '')} {first.get('dataset', '')}:{first.get('line', '')}"
        out.append(f"<h3>Prompt {pid} <small>({html.escape(where)})</small></h3>")
        out.append(
            f"<p><b>Question:</b> {html.escape(str(first.get('question', '')))}<br>"
            f"<b>Chosen:</b> {html.escape(str(first.get('chosen', '')))}<br>"
            f"<b>Rejected:</b> {html.escape(str(first.get('rejected', '')))}</p>"
        )
        body = "".join(
            f'<tr><td>{int(r.get("step", 0))}</td><td class="gen">{_visible(str(r["generated"]))}'
            + (" <i>(ran out of tokens)</i>" if r.get("hit_limit") else "")
            + "</td></tr>"
            for r in sorted(rows, key=lambda r: r.get("step", 0))
        )
        out.append(f"<table><tr><th>step</th><th>greedy answer</th></tr>{body}</table>")
    return "\n".join(out)


def _answers_html(answers: list[dict[str, Any]], shown: int = 12) -> str:
    """Each benchmark's answers at its last evaluation (the first ``shown`` questions)."""
    if not answers:
        return "<p>No benchmark answers (set <code>training.eval_benchmarks</code> to log some).</p>"
    out = []
    for name in sorted({str(r.get("benchmark")) for r in answers}):
        rows = [r for r in answers if str(r.get("benchmark")) == name]
        last = max(int(r.get("step", 0)) for r in rows)
        rows = [r for r in rows if int(r.get("step", 0)) == last]
        out.append(
            f"<h3>{html.escape(name)} at step {last} <small>({len(rows)} questions; {BENCHMARKS_FILE} has all)</small></h3>"
        )
        body = "".join(
            f"<tr><td>{html.escape(str(r.get('index')))}</td><td>{html.escape(str(r.get('question')))}</td>"
            f'<td>{html.escape(str(r.get("answer")))}</td><td class="gen">{_visible(str(r.get("prediction", "")))}</td>'
            f"<td>{html.escape(str(r.get('extracted')))}</td><td>{'✓' if r.get('correct') else '✗'}</td></tr>"
            for r in rows[:shown]
        )
        out.append(
            "<table><tr><th>index</th><th>question</th><th>answer</th><th>greedy answer</th><th>read as</th>"
            f"<th></th></tr>{body}</table>"
        )
    return "\n".join(out)


def _json_block(run_dir: Path, name: str) -> str:
    p = run_dir / name
    if not p.is_file():
        return ""
    return f"<h3>{html.escape(name)}</h3><pre>{html.escape(p.read_text(encoding='utf-8'))}</pre>"


def render_html(
    run_dir: Path,
    m: RunMetrics,
    findings: list[Finding],
    plots: dict[str, Path],
    summary_png: Path,
    samples: list[dict[str, Any]],
) -> str:
    """The self-contained report page."""
    missing = [s.name for s in PLOTS if s.name not in plots]  # the benchmark plots are optional
    notes = []
    if missing:
        notes.append(f"Not logged in this run: {', '.join(missing)}.")
    if m.bad_lines:
        notes.append(
            f"{len(m.bad_lines)} malformed line(s) in {METRICS_FILE} skipped (first: line {m.bad_lines[0]})."
        )
    last_step = int(m.train[-1].get("step", 0)) if m.train else 0
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>MPO run report: {html.escape(run_dir.name)}</title>
<style>{CSS}</style></head><body>
<h1>MPO run report: {html.escape(str(run_dir))}</h1>
<p>{len(m.train)} training logs up to step {last_step}, {len(m.eval)} evaluations.
Verdict: <b>{html.escape(headline(findings))}</b>. {html.escape(" ".join(notes))}</p>
<h2>Verdict</h2>
{_findings_html(findings)}
<h2>Summary</h2>
{_img(summary_png, "summary")}
<h2>All curves</h2>
<p>Solid: training logs; dashed with markers: held-out evaluation; grey: the value at π = πref.</p>
<div class="grid">{"".join(_img(p) for p in plots.values())}</div>
<h2>Sample generations</h2>
{_samples_html(samples)}
<h2>Benchmark answers</h2>
{_answers_html(m.answers)}
<h2>Run</h2>
{_json_block(run_dir, "summary.json")}{_json_block(run_dir, "run_info.json")}{_json_block(run_dir, "config.yaml")}
</body></html>
"""


# ---- entry points ----------------------------------------------------------------------------
@dataclass
class Report:
    html: Path
    summary_png: Path
    plots: dict[str, Path]
    findings: list[Finding]


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Read ``run_dir`` and write ``report.html``, ``summary.png`` and every plot to ``out_dir``."""
    run = Path(run_dir)
    metrics_path = run / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{metrics_path} not found: is {run} a training output dir (training.output_dir)?"
        )
    out = Path(out_dir) if out_dir is not None else run / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    m = read_metrics(metrics_path)
    if not m.train and not m.eval:
        raise ValueError(
            f"{metrics_path}: no training or evaluation log lines (has the run logged a step yet?)"
        )
    m.samples = read_samples(run / SAMPLES_FILE)
    m.answers = read_samples(run / BENCHMARKS_FILE, "prediction")
    findings = diagnose(m, read_loss_settings(run))
    plots = write_plots(m, out)
    summary_png = write_summary_figure(m, findings, out / "summary.png", run.resolve().name)
    samples = m.samples
    page = out / "report.html"
    page.write_text(render_html(run, m, findings, plots, summary_png, samples), encoding="utf-8")
    return Report(page, summary_png, plots, findings)


def format_findings(findings: list[Finding]) -> str:
    lines = [f"verdict: {headline(findings)}"]
    for f in findings:
        lines.append(f"  [{f.level}] {f.title}: {f.detail}")
        if f.advice:
            lines.append(f"        try: {f.advice}")
    return "\n".join(lines)


def cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mpo report", description="Plots, verdict and samples for a training run"
    )
    p.add_argument("run_dir", help="training.output_dir of the run (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR/report)")
    a = p.parse_args(argv)
    try:
        rep = write_report(a.run_dir, a.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_findings(rep.findings))
    print(f"report: {rep.html}  ({len(rep.plots)} plots)")
    return 0
