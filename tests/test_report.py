"""`mpo report`: every plot and a self-contained HTML from a recorded metrics.jsonl, and the verdict.

The runs are synthetic metrics files whose curves follow the MPO definitions (rewards = β·Δ,
margin = chosen − rejected reward, L_p = softplus(−margin), L = w_p·L_p + w_q·L_q + w_g·L_g), so
the checks see the same shapes a real run produces.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from mpo.report import PLOTS, diagnose, read_loss_settings, read_metrics, write_report

BETA = 0.1


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _row(
    step: int, chosen_logp: float, rejected_logp: float, sft: float, acc: float, lr: float, delta: float
):
    ref_c, ref_r = -60.0, -65.0
    rc, rr = BETA * (chosen_logp - ref_c), BETA * (rejected_logp - ref_r)
    margin = rc - rr
    dpo = _softplus(-margin)
    bco = _softplus(-(rc - delta)) + _softplus(rr - delta)
    return {
        "step": step,
        "epoch": step / 100,
        "time": 1000.0 + step,
        "loss": 0.8 * dpo + 0.2 * bco + 1.0 * sft,
        "grad_norm": 1.0,
        "learning_rate": lr,
        "loss/dpo": dpo,
        "loss/bco": bco,
        "loss/sft": sft,
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/accuracies": acc,
        "rewards/margins": margin,
        "logps/chosen": chosen_logp,
        "logps/rejected": rejected_logp,
        "logps/ref_chosen": ref_c,
        "logps/ref_rejected": ref_r,
        "bco/delta": delta,
        "tokens_per_s": 900.0,
        "pairs_per_s": 9.0,
    }


def synthetic_run(kind: str, n: int = 40) -> list[dict]:
    """``healthy``: chosen up, rejected down a little, NLL falls. ``collapse``: both fall, NLL rises.
    ``stuck``: nothing separates. ``zero``: the loss is 0 from the first log."""
    rows = []
    delta_sum, delta_n = 0.0, 0
    for k in range(n + 1):
        s = k / n
        lr = 1e-6 * 0.5 * (1 + math.cos(math.pi * s))
        if kind == "healthy":
            c, r, sft, acc = -60 + 2 * s, -65 - 12 * s, 0.3 + 0.5 * math.exp(-3 * s), 0.5 + 0.35 * s
        elif kind == "collapse":
            c, r, sft, acc = -60 - 140 * s, -65 - 330 * s, 0.5 + 1.2 * s, min(1.0, 0.5 + s)
        elif kind == "stuck":
            c, r, sft, acc = -60 + 0.01 * (-1) ** k, -65.0, 0.5, 0.5 + 0.03 * (-1) ** k
        else:
            c, r, sft, acc = -60.0, -65.0, 0.0, 0.0
        row = _row(k, c, r, sft, acc, lr, delta_sum / max(delta_n, 1))
        delta_sum += row["rewards/chosen"] + row["rewards/rejected"]
        delta_n += 2
        if kind == "zero":
            row.update({"loss": 0.0, "loss/dpo": 0.0, "loss/bco": 0.0})
        rows.append(row)
        if k and k % 10 == 0:
            ev = {f"eval_{key}": v for key, v in row.items() if "/" in key or key == "loss"}
            ev.update({"step": k, "epoch": k / 100, "time": 1000.0 + k, "eval_runtime": 1.0})
            rows.append(ev)
    rows.append({"step": n, "train_runtime": 50.0, "train_loss": 1.0})  # Trainer's final summary line
    return rows


def write_run(tmp_path: Path, kind: str, loss_cfg: str | None = None) -> Path:
    run = tmp_path / kind
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for row in synthetic_run(kind):
            f.write(json.dumps(row) + "\n")
    if loss_cfg is not None:
        (run / "config.yaml").write_text(loss_cfg)
    return run


def verdict(run: Path):
    """The findings ``mpo report`` would print, without drawing the plots."""
    return diagnose(read_metrics(run / "metrics.jsonl"), read_loss_settings(run))


def levels(findings, level: str) -> set[str]:
    return {f.check for f in findings if f.level == level}


def test_report_writes_html_and_every_plot(tmp_path):
    run = write_run(tmp_path, "healthy")
    samples = [
        {
            "step": st,
            "prompt_id": 0,
            "split": "eval",
            "dataset": "d",
            "line": 3,
            "question": "What <b>colour</b>?",
            "chosen": "red",
            "rejected": "blue",
            "generated": f"answer at {st}",
        }
        for st in (0, 20)
    ]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    rep = write_report(run)
    out = run / "report"
    assert rep.html == out / "report.html"
    assert {p.name for p in out.glob("*.png")} == {f"{s.name}.png" for s in PLOTS} | {"summary.png"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = rep.html.read_text()
    # Self-contained: every image is inlined, nothing is fetched.
    assert page.count('src="data:image/png;base64,') == len(PLOTS) + 1
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)
    # Samples are shown per step, escaped.
    assert "answer at 0" in page and "answer at 20" in page
    assert "What &lt;b&gt;colour&lt;/b&gt;?" in page


def test_metrics_split_train_eval_and_skip_bad_lines(tmp_path):
    run = write_run(tmp_path, "healthy")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"step": 41, "loss": "nan", "loss/sft": 1.0}) + "\n")
    m = read_metrics(run / "metrics.jsonl")
    assert len(m.train) == 42 and len(m.eval) == 4
    assert m.bad_lines == [47]  # 41 train + 4 eval + 1 summary lines come first
    steps, values = m.series("loss")
    assert math.isnan(values[-1]) and steps[-1] == 41
    assert "nonfinite" in levels(diagnose(m), "bad")


def test_collapse_run_is_flagged(tmp_path):
    found = verdict(write_run(tmp_path, "collapse"))
    assert "collapse" in levels(found, "bad")
    assert "margins_exploding" in levels(found, "warn")


def test_healthy_run_is_not_flagged(tmp_path):
    found = verdict(write_run(tmp_path, "healthy"))
    assert not levels(found, "bad") and not levels(found, "warn")
    assert {"initial_loss", "healthy"} <= levels(found, "ok")


def test_stuck_and_zero_runs(tmp_path):
    stuck = verdict(write_run(tmp_path, "stuck"))
    assert "accuracy_stuck" in levels(stuck, "warn")
    assert "collapse" not in levels(stuck, "bad")
    zero = verdict(write_run(tmp_path, "zero"))
    assert "loss_zero" in levels(zero, "bad")


def test_initial_loss_uses_the_run_weights(tmp_path):
    """0.832 + NLL holds for the paper's weights only; the check reads the run's config.yaml."""
    rows = synthetic_run("healthy", n=8)
    first = rows[0]
    # With w_p=1, w_q=0, w_g=1 the step-0 loss is ln2 + NLL (π = πref): rewrite it that way.
    first["loss"] = math.log(2) + first["loss/sft"]
    for name, cfg, flagged in (
        ("paper", None, True),  # 0.832 + NLL expected, ln2 + NLL logged: 0.139 apart
        (
            "custom",
            "loss:\n  preference_weight: 1.0\n  quality_weight: 0.0\n  generation_weight: 1.0\n",
            False,
        ),
    ):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if cfg:
            (run / "config.yaml").write_text(cfg)
        found = verdict(run)
        assert ("initial_loss" in levels(found, "warn")) is flagged, name


def test_cli_report_command(tmp_path, capsys):
    from mpo.cli import main

    run = write_run(tmp_path, "collapse")
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "verdict: problems found" in printed and "collapse" in printed
    page = (tmp_path / "out" / "report.html").read_text()
    assert "collapse pattern" in page and "problems found" in page
    assert main(["report", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("weights", [(0.8, 0.2, 1.0), (1.0, 0.0, 0.5)])
def test_initial_loss_check_agrees_with_the_loss_module(tmp_path, weights):
    """The report's expected step-0 loss is the loss module's own value at π = πref, δ = 0: a
    first row logged from ``mpo.loss.MPOLoss`` passes, the same row with the loss off by 0.5 is
    flagged."""
    import torch

    from mpo.config import LossConfig
    from mpo.loss import MPOLoss, PairLogps
    from mpo.report import RunMetrics, check_initial_loss

    w_p, w_q, w_g = weights
    loss_fn = MPOLoss(LossConfig(preference_weight=w_p, quality_weight=w_q, generation_weight=w_g))
    logps = torch.tensor([-40.0, -12.0, -90.0])
    tokens = torch.tensor([20, 6, 30])
    pairs = PairLogps(logps, logps - 3, logps, logps - 3, tokens, tokens)  # π = πref
    terms = loss_fn(pairs)
    loss = loss_fn.combine(terms, 3.0, float(tokens.sum())).item()
    sft = terms.sft.mean().item()  # sequence normalisation: the mean of per-token NLLs
    (tmp_path / "config.yaml").write_text(
        f"loss:\n  preference_weight: {w_p}\n  quality_weight: {w_q}\n  generation_weight: {w_g}\n"
    )
    settings = read_loss_settings(tmp_path)
    row = {"step": 1, "loss": loss, "loss/sft": sft, "loss/dpo": terms.preference.mean().item()}
    assert [f.level for f in check_initial_loss(RunMetrics(train=[row]), settings)] == ["ok"]
    off = {**row, "loss": loss + 0.5}
    assert [f.level for f in check_initial_loss(RunMetrics(train=[off]), settings)] == ["warn"]


def test_report_command_imports_no_torch(tmp_path):
    """`mpo report` reads JSON and draws plots: it must not pay for importing torch."""
    import subprocess
    import sys

    run = write_run(tmp_path, "healthy")
    code = (
        "import sys\nfrom mpo.cli import main\nrc = main(['report', sys.argv[1]])\n"
        "print('RC', rc, 'HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True)
    assert "RC 0 HEAVY []" in out.stdout, out.stdout[-500:]
    assert (run / "report" / "report.html").is_file()


def test_two_runs_in_one_metrics_file_are_flagged(tmp_path):
    single = write_run(tmp_path, "healthy")
    assert "mixed_runs" not in levels(verdict(single), "warn")
    rows = (single / "metrics.jsonl").read_text()
    (single / "metrics.jsonl").write_text(rows + rows)  # a second run appended to the first
    found = [f for f in verdict(single) if f.check == "mixed_runs"]
    assert len(found) == 1 and found[0].level == "warn"
    last = synthetic_run("healthy")[-1]["step"]
    assert f"goes back from {last} to {synthetic_run('healthy')[0]['step']}" in found[0].detail


# ---- repetition alarm and benchmarks -------------------------------------------------------------
HEALTHY_ANSWERS = ["The shape is green.", "The background is black."]
LOOPING_ANSWERS = ["The shape is green. The shape is green. The shape is green. The", "black " * 12]


def _with_generations(run: Path, late_answers: list[str], accuracy: tuple[float, float]) -> None:
    """Samples at steps 0 and 40 (healthy, then ``late_answers``) and a benchmark ``shapes``,
    logged as SampleGenerationCallback / BenchmarkEvalCallback write them."""
    from mpo.repetition import Generation, summarize

    samples, answers = [], []
    with open(run / "metrics.jsonl", "a") as f:
        for step, texts, acc in ((0, HEALTHY_ANSWERS, accuracy[0]), (40, late_answers, accuracy[1])):
            gens = [Generation(t, hit_limit=len(t) > 40) for t in texts]
            row = {"step": step, "epoch": step / 100, "time": 2000.0 + step}
            row |= {f"samples/{k}": v for k, v in summarize(gens).items()}
            f.write(json.dumps(row) + "\n")
            bench = {"step": step, "bench/shapes/accuracy": acc, "bench/shapes/accuracy/shape_color": acc}
            bench |= {f"bench/shapes/{k}": v for k, v in summarize(gens).items()}
            f.write(json.dumps(bench) + "\n")
            for pid, g in enumerate(gens):
                samples.append(
                    {
                        "step": step,
                        "prompt_id": pid,
                        "question": "q",
                        "generated": g.text,
                        "hit_limit": g.hit_limit,
                    }
                )
                answers.append(
                    {
                        "step": step,
                        "benchmark": "shapes",
                        "index": str(pid),
                        "question": "q",
                        "answer": "A",
                        "prediction": g.text,
                        "extracted": None,
                        "correct": False,
                        "hit_limit": g.hit_limit,
                    }
                )
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run / "benchmarks.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))


def test_repetition_rise_is_flagged_with_the_worst_sample(tmp_path):
    run = write_run(tmp_path, "healthy")
    _with_generations(run, LOOPING_ANSWERS, (0.25, 0.75))
    rep = write_report(run)
    (rep_finding,) = [f for f in rep.findings if f.check == "repetition"]
    assert rep_finding.level == "warn"
    # both sources rose: limit share 0 -> 1 (both late answers run past 40 characters), runs 1 -> 12
    assert "samples: limit_share 0 → 1 (step 0 → 40)" in rep_finding.detail
    assert "longest_run 1 → 12" in rep_finding.detail and "bench/shapes:" in rep_finding.detail
    assert (
        'Worst at step 40 (prompt 1: 12 copies in a row, ran out of tokens): "black black'
        in rep_finding.detail
    )
    assert "Worst at step 40 (question 1: 12 copies" in rep_finding.detail
    assert {"bench_shapes", "repetition", "repetition_runs"} <= set(rep.plots)
    page = rep.html.read_text()
    assert "Generations became repetitive" in page and "(ran out of tokens)" in page
    assert "<h3>shapes at step 40" in page


def test_healthy_generations_and_rising_accuracy_are_not_flagged(tmp_path):
    run = write_run(tmp_path, "healthy")
    _with_generations(run, ["The shape is red.", "The background is gray."], (0.25, 0.75))
    found = verdict(run)
    m = read_metrics(run / "metrics.jsonl")
    m.samples = []
    assert not levels(found, "warn") and not levels(found, "bad")
    (bench,) = [f for f in found if f.check == "benchmarks"]
    assert bench.detail == "shapes 0.250 → 0.750 (step 0 → 40)."
    assert len(m.generation) == 4 and len(m.train) == 41  # generation rows are not training logs


def test_falling_benchmark_accuracy_is_flagged(tmp_path):
    run = write_run(tmp_path, "healthy")
    _with_generations(run, HEALTHY_ANSWERS, (0.75, 0.5))
    assert "benchmark_drop" in levels(verdict(run), "warn")
