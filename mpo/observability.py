"""Seeing what training does: loggers, a progress line, the start-up summary, sample generations,
benchmark accuracy during training (``BenchmarkEvalCallback``).

Wiring (see ``mpo.run.build_trainer``)::

    configure_loggers(training, cfg.extras, cfg.to_dict())   # before TrainingArguments(**training)
    trainer = MPOTrainer(...)
    attach_observability(trainer, cfg)                       # callbacks; idempotent
    print(startup_summary(trainer, cfg))                     # rank 0

Only rank 0 writes anything: transformers' ``WandbCallback`` and ``TensorBoardCallback`` already
check ``state.is_world_process_zero`` in ``setup`` / ``on_train_begin`` / ``on_log``, and every
callback here does the same.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import ProgressCallback, TrainerCallback
from transformers.integrations import TensorBoardCallback, WandbCallback
from transformers.trainer_callback import PrinterCallback

from mpo.config import ConfigError
from mpo.data.template import IGNORE_INDEX, TemplateEncoder
from mpo.data.tiling import VisionSpec
from mpo.distributed import deepspeed_stage
from mpo.eval import read_benchmark
from mpo.eval_model import BenchmarkRunner, EvalSettings, evaluate
from mpo.repetition import Generation, hit_limit, summarize
from mpo.stats import percentiles

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
BENCHMARKS_FILE = "benchmarks.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
WANDB_PROJECT_DEFAULT = "internvl-mpo"


# ---- loggers ---------------------------------------------------------------------------------
def report_targets(report_to: Any) -> list[str]:
    """``training.report_to`` (a string, a list, ``none`` or ``all``) as a list of integration names."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [str(n).strip().lower() for n in names]
    return [] if names in ([], ["none"]) else names


def wandb_mode(environ: dict[str, str] | None = None) -> str:
    """The wandb mode to use: an explicit ``WANDB_MODE`` wins; otherwise online only with an API key."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if env.get("WANDB_API_KEY") else "offline"


def configure_loggers(training: dict[str, Any], extras, cfg_dict: dict[str, Any]) -> None:
    """Prepare ``report_to`` integrations; call before ``TrainingArguments(**training)``.

    * wandb: ``WANDB_MODE`` is set to ``offline`` when no ``WANDB_API_KEY`` is present (``online``
      when it is), unless the user already set ``WANDB_MODE``. The run itself (name, tags, the
      resolved config, files under ``<output_dir>/wandb``) is created by ``MPOWandbCallback``.
    * tensorboard: works through transformers; ``attach_observability`` points its writer at
      ``<output_dir>/tensorboard``.
    * ``training.run_name`` defaults to the output folder's name (wandb shows it as the run name).

    Args:
        training: the ``training`` section (TrainingArguments fields); modified in place.
        extras: ``RunExtras`` (``run_tags`` become wandb tags).
        cfg_dict: the resolved config (``ExperimentConfig.to_dict()``); checked to be JSON-able here
            so a bad value fails at start-up rather than inside wandb.
    """
    targets = report_targets(training.get("report_to", "none"))
    for name, module in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if name in targets:
            try:
                __import__(module)
            except ModuleNotFoundError as exc:
                raise ConfigError(
                    f"training.report_to includes '{name}' but the '{module}' package is not installed"
                ) from exc
    if not isinstance(extras.run_tags, list) or not all(isinstance(t, str) for t in extras.run_tags):
        raise ConfigError(f"training.run_tags must be a list of strings, got {extras.run_tags!r}")
    json.dumps(cfg_dict, default=str)
    if training.get("output_dir") and not training.get("run_name"):
        training["run_name"] = Path(str(training["output_dir"])).name
    if "wandb" in targets or "all" in targets:
        os.environ["WANDB_MODE"] = wandb_mode()


def log_from_callback(trainer, logs: dict[str, float]) -> None:
    """``trainer.log(logs)`` from inside another callback event, keeping the step's own decision to
    log: ``CallbackHandler.on_log`` clears ``control.should_log`` on the shared control object, which
    would silently drop the training log of the step that just ran."""
    should_log = trainer.control.should_log
    trainer.log(logs)
    trainer.control.should_log = should_log


class MPOWandbCallback(WandbCallback):
    """transformers' WandbCallback, but the run is created with our name, tags, folder and config.

    ``WandbCallback.setup`` only calls ``wandb.init`` when no run exists (transformers documents
    subclassing ``setup`` for this), so creating it first here keeps the rest of its behaviour.
    """

    def __init__(self, cfg_dict: dict[str, Any], tags: list[str]):
        super().__init__()
        self.cfg_dict = cfg_dict
        self.tags = list(tags)

    def setup(self, args, state, model, **kwargs):
        if state.is_world_process_zero and self._wandb.run is None:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self._wandb.init(
                project=os.getenv("WANDB_PROJECT", WANDB_PROJECT_DEFAULT),
                name=args.run_name,
                tags=self.tags or None,
                dir=str(out),
                mode=wandb_mode(),
                config={"mpo": self.cfg_dict},
            )
        super().setup(args, state, model, **kwargs)


def _tensorboard_writer(trainer):
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            return cb.tb_writer
    return None


def _find(trainer, cls) -> TrainerCallback | None:
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, cls)), None)


def attach_observability(trainer, cfg) -> None:
    """Add (once) the progress, wandb, tensorboard and sample-generation callbacks to ``trainer``."""
    if _find(trainer, MPOProgressCallback) is not None:
        return
    out = Path(trainer.args.output_dir)
    if _find(trainer, WandbCallback) is not None:
        trainer.remove_callback(WandbCallback)
        trainer.add_callback(MPOWandbCallback(cfg.to_dict(), cfg.extras.run_tags))
    tb = _find(trainer, TensorBoardCallback)
    if tb is not None and not os.getenv("TENSORBOARD_LOGGING_DIR"):
        tb.logging_dir = str(out / TENSORBOARD_SUBDIR)
    # Replace transformers' bar (which prints every log dict) with one that keeps a short postfix.
    bar = _find(trainer, ProgressCallback) is not None
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(MPOProgressCallback(show_bar=bar))
    if cfg.extras.sample_steps > 0:
        trainer.add_callback(SampleGenerationCallback(trainer, cfg.extras))
    if cfg.extras.eval_benchmarks:
        trainer.add_callback(BenchmarkEvalCallback(trainer, cfg))


# ---- progress --------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def format_train_log(step: int, max_steps: int, logs: dict[str, Any]) -> str:
    """One compact line for a training log: loss and its terms, accuracy, margin, δ, lr, pairs/s."""
    g = logs.get
    return (
        f"step {step}/{max_steps} | loss {_fmt(g('loss'))} (dpo {_fmt(g('loss/dpo'))} bco {_fmt(g('loss/bco'))} "
        f"sft {_fmt(g('loss/sft'))}) | acc {_fmt(g('rewards/accuracies'), '.3f')} "
        f"margin {_fmt(g('rewards/margins'))} | δ {_fmt(g('bco/delta'))} | lr {_fmt(g('learning_rate'), '.3g')} "
        f"| {_fmt(g('pairs_per_s'), '.3g')} pairs/s"
    )


def format_eval_log(step: int, logs: dict[str, Any]) -> str:
    g = logs.get
    return (
        f"eval @ step {step} | loss {_fmt(g('eval_loss'))} (dpo {_fmt(g('eval_loss/dpo'))} bco "
        f"{_fmt(g('eval_loss/bco'))} sft {_fmt(g('eval_loss/sft'))}) | acc {_fmt(g('eval_rewards/accuracies'), '.3f')} "
        f"margin {_fmt(g('eval_rewards/margins'))}"
    )


def format_bench_log(step: int, logs: dict[str, Any]) -> str:
    """One line per benchmark evaluation: accuracy and the repetition numbers of its answers."""
    names = sorted({k.split("/")[1] for k in logs if k.startswith("bench/") and k.endswith("/accuracy")})
    parts = []
    for n in names:
        g = {k.split("/", 2)[2]: v for k, v in logs.items() if k.startswith(f"bench/{n}/")}.get
        parts.append(
            f"{n} accuracy {_fmt(g('accuracy'), '.3f')} (answered {_fmt(g('answered'), '.2f')}, "
            f"at token limit {_fmt(g('limit_share'), '.2f')}, longest run {_fmt(g('longest_run'), '.0f')})"
        )
    return f"benchmarks @ step {step} | " + " | ".join(parts)


class MPOProgressCallback(ProgressCallback):
    """tqdm bar (step, ETA) with a postfix of loss / acc / margin / pairs/s, and one line per log.

    With ``show_bar=False`` (``disable_tqdm``) only the lines are printed, which suits log files.
    """

    def __init__(self, show_bar: bool = True):
        super().__init__()
        self.show_bar = show_bar
        self.lines: list[str] = []  # what was printed (kept for tests and for a crash dump)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_train_begin(args, state, control, **kwargs)
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.show_bar and self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.show_bar:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            line = format_train_log(state.global_step, state.max_steps, logs)
            if self.training_bar is not None:
                self.training_bar.set_postfix(
                    loss=_fmt(logs.get("loss")),
                    acc=_fmt(logs.get("rewards/accuracies"), ".3f"),
                    margin=_fmt(logs.get("rewards/margins"), ".3g"),
                    pairs_s=_fmt(logs.get("pairs_per_s"), ".3g"),
                    refresh=False,
                )
        elif "eval_loss" in logs:
            line = format_eval_log(state.global_step, logs)
        elif any(k.startswith("bench/") for k in logs):
            line = format_bench_log(state.global_step, logs)
        elif "train_runtime" in logs:
            line = f"done: {state.global_step} steps in {_fmt(logs['train_runtime'], '.1f')} s, mean loss {_fmt(logs.get('train_loss'))}"
        else:
            return
        self.lines.append(line)
        self._write(line)

    def _write(self, line: str) -> None:
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


# ---- start-up summary ------------------------------------------------------------------------
def tiles_per_pair(dataset, max_items: int = 32) -> list[int]:
    """Tile counts of up to ``max_items`` evenly spaced pairs (0 for text-only; skipped pairs left out).

    Encodes the pairs with the real data path, so the counts are exactly what training will see.
    """
    n = len(dataset)
    if n == 0:
        return []
    idx = sorted({int(k * n / min(n, max_items)) for k in range(min(n, max_items))})
    out = []
    for i in idx:
        pair, _ = dataset[i]
        if pair is not None:
            out.append(int(sum(pair["num_tiles"])))
    return out


def zero_stage(trainer) -> int | None:
    """The DeepSpeed ZeRO stage, or None without DeepSpeed."""
    return deepspeed_stage(trainer.args.deepspeed) if trainer.is_deepspeed_enabled else None


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def startup_summary(trainer, cfg, sample_items: int = 32) -> str:
    """One line: model, trainable params, pairs by source, tiles/pair, world, batch, ZeRO, reference."""
    args = trainer.args
    params = list(trainer.model.parameters())
    # Under ZeRO-3 a local parameter is a placeholder; ds_numel is the real size.
    sizes = [getattr(p, "ds_numel", p.numel()) for p in params]
    trainable = sum(s for s, p in zip(sizes, params) if p.requires_grad)
    train = trainer.train_dataset
    by_source = ", ".join(f"{k} {v}" for k, v in train.source.counts().items())
    parts = [
        f"model {cfg.model.path}",
        f"trainable {_count(trainable)}/{_count(sum(sizes))} params",
        f"train {len(train)} pairs ({by_source})",
    ]
    if trainer.eval_dataset is not None:
        parts.append(f"eval {len(trainer.eval_dataset)} pairs")
    tiles = tiles_per_pair(train, sample_items)
    if tiles:
        p = percentiles(tiles, (50, 90, 100))
        parts.append(f"tiles/pair p50 {p['p50']} p90 {p['p90']} max {p['max']} (of {len(tiles)})")
    world = args.world_size
    accum = args.gradient_accumulation_steps
    per_dev = args.per_device_train_batch_size
    stage = zero_stage(trainer)
    if cfg.data.packing:
        batch = f"batch: packed rows of <= {cfg.data.max_tokens_per_batch} tokens x{accum}x{world} per step"
    else:
        batch = f"batch {per_dev}x{accum}x{world}={per_dev * accum * world} pairs/step"
    parts += [
        f"world {world}",
        batch,
        f"ZeRO {stage}" if stage is not None else "no DeepSpeed",
        f"reference {cfg.model.reference}",
    ]
    return " | ".join(parts)


# ---- sample generations ----------------------------------------------------------------------
def prompt_from_item(item: dict[str, Any]) -> torch.Tensor:
    """The prompt ids of an encoded pair: the chosen sequence up to its first trained label, ``(P,)``."""
    labels = item["chosen_labels"]
    trained = torch.nonzero(labels != IGNORE_INDEX)
    if trained.numel() == 0:
        raise ValueError("pair has no trained response token; cannot find where its prompt ends")
    return item["chosen_input_ids"][: int(trained[0, 0])]


def _image_label(value: Any) -> Any:
    """A record's ``image`` as samples.jsonl can hold it: paths as they are; images stored inside the
    data (HF ``Image`` bytes, base64 data URLs read by ``mpo.data.formats``) by their path or a mark."""
    if isinstance(value, list):
        return [_image_label(v) for v in value]
    if isinstance(value, dict):
        return value.get("path") or "<image stored in the data>"
    return value


class SampleGenerationCallback(TrainerCallback):
    """Greedy answers to fixed held-out prompts at the start, every ``extras.sample_steps`` steps and at the end.

    The prompts are the first ``sample_num_prompts`` usable pairs of the eval dataset (the train
    dataset when there is none). Answers go to ``<output_dir>/samples.jsonl`` (one JSON line per
    prompt per step), to wandb as a table and to tensorboard as text when those are enabled.
    Generation runs on rank 0 only, except under ZeRO-3 where every rank must take part in each
    forward (parameters are sharded), so all ranks generate with ``synced_gpus`` and rank 0 writes.
    The model's train/eval mode is restored afterwards.
    """

    def __init__(self, trainer, extras):
        self.trainer = trainer
        self.every = int(extras.sample_steps)
        self.num_prompts = int(extras.sample_num_prompts)
        self.max_new_tokens = int(extras.sample_max_new_tokens)
        self.prompts: list[dict[str, Any]] | None = None
        self.end_of_turn: int | None = None  # set with the prompts
        self.last_step: int | None = None

    def _collect_prompts(self) -> list[dict[str, Any]]:
        ds = (
            self.trainer.eval_dataset if self.trainer.eval_dataset is not None else self.trainer.train_dataset
        )
        split = "eval" if self.trainer.eval_dataset is not None else "train"
        # Answers end with the template's end-of-turn token (``<|im_end|>``, Phi-3's ``<|end|>``),
        # which is not every tokenizer's EOS (InternLM2's is ``</s>``).
        self.end_of_turn = getattr(ds, "pairs", ds).encoder.template.eos_id
        prompts = []
        for i in range(len(ds)):
            if len(prompts) >= self.num_prompts:
                break
            item, _ = ds[i]
            if item is None:
                continue
            _, _, record = ds.source.get(i)
            prompts.append(
                {
                    "prompt_id": len(prompts),
                    "split": split,
                    "dataset": item["dataset"],
                    "line": item["line"],
                    "question": record.get("question", ""),
                    "image": _image_label(record.get("image")),
                    "chosen": record.get("chosen", ""),
                    "rejected": record.get("rejected", ""),
                    "input_ids": prompt_from_item(item),
                    "pixel_values": item.get("pixel_values"),
                }
            )
        return prompts

    def _should_run(self, state) -> bool:
        stage = zero_stage(self.trainer)
        return state.is_world_process_zero or stage == 3

    @torch.no_grad()
    def generate(self, model) -> list[Generation]:
        """Greedy answers for every prompt (and whether each ran out of tokens); the model's mode
        is restored afterwards."""
        tok = self.trainer.processing_class
        device = self.trainer.args.device
        dtype = next(model.parameters()).dtype
        synced = zero_stage(self.trainer) == 3
        was_training = model.training
        model.eval()
        answers = []
        try:
            for p in self.prompts:
                ids = p["input_ids"].unsqueeze(0).to(device)
                kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if p["pixel_values"] is not None:
                    kwargs["pixel_values"] = p["pixel_values"].to(device=device, dtype=dtype)
                out = model.generate(
                    **kwargs,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    eos_token_id=self.end_of_turn,
                    pad_token_id=tok.pad_token_id,
                    synced_gpus=synced,
                )
                new = out[0, ids.shape[1] :].tolist()
                answers.append(
                    Generation(
                        tok.decode(new, skip_special_tokens=True),
                        hit_limit(new, self.max_new_tokens, self.end_of_turn),
                    )
                )
        finally:
            model.train(was_training)
        return answers

    def _run(self, state, model) -> None:
        if self.last_step == state.global_step or not self._should_run(state):
            return
        if self.prompts is None:
            self.prompts = self._collect_prompts()
        if not self.prompts:
            return
        unwrapped = self.trainer.accelerator.unwrap_model(model if model is not None else self.trainer.model)
        answers = self.generate(unwrapped)
        self.last_step = state.global_step
        if state.is_world_process_zero:
            self._write(state.global_step, answers)
            # Repetition alarm numbers (mpo.repetition), read by `mpo report` against step 0.
            log_from_callback(self.trainer, {f"samples/{k}": v for k, v in summarize(answers).items()})

    def _write(self, step: int, answers: list[Generation]) -> None:
        now = time.time()
        rows = []
        for p, answer in zip(self.prompts, answers):
            keep = ("prompt_id", "split", "dataset", "line", "question", "image", "chosen", "rejected")
            row = {"step": step, "time": now, **{k: p[k] for k in keep}, "generated": answer.text}
            rows.append({**row, "hit_limit": answer.hit_limit})
        path = Path(self.trainer.args.output_dir) / SAMPLES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._to_wandb(step, rows)
        self._to_tensorboard(step, rows)

    def _to_wandb(self, step: int, rows: list[dict[str, Any]]) -> None:
        if _find(self.trainer, WandbCallback) is None:
            return
        import wandb

        if wandb.run is None:
            return
        table = wandb.Table(columns=["step", "prompt_id", "question", "chosen", "generated"])
        for r in rows:
            table.add_data(step, r["prompt_id"], r["question"], r["chosen"], r["generated"])
        wandb.log({"samples/generations": table, "train/global_step": step})

    def _to_tensorboard(self, step: int, rows: list[dict[str, Any]]) -> None:
        writer = _tensorboard_writer(self.trainer)
        if writer is None:
            return
        for r in rows:
            text = f"**question:** {r['question']}\n\n**chosen:** {r['chosen']}\n\n**generated:** {r['generated']}"
            writer.add_text(f"samples/prompt_{r['prompt_id']}", text, step)
        writer.flush()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._run(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._run(state, model)  # the final model's answers, unless this step was just sampled


class BenchmarkEvalCallback(TrainerCallback):
    """Accuracy on VLMEvalKit-style TSV benchmarks (``training.eval_benchmarks``) at the start,
    every ``eval_benchmark_steps`` steps and at the end of a run that reached ``max_steps``.

    Every rank takes part: rank ``r`` answers questions ``r, r + world, ...`` (and keeps only their
    images), the answers are gathered on every rank, and each rank logs the same metrics
    (``bench/<name>/accuracy``, ``accuracy/<category>``, ``answered``, and the repetition numbers
    ``limit_share``, ``longest_run``, ``longest_run_mean``, ``distinct2``): ``metrics.jsonl``, wandb
    and TensorBoard get them from rank 0. Rank 0 appends every answer to ``benchmarks.jsonl``.
    Questions are encoded with the run's template, system prompt and tile settings
    (``mpo.eval_model``); under ZeRO-3 every rank joins every forward (``synced_gpus``).
    """

    def __init__(self, trainer, cfg):
        self.trainer = trainer
        x, d = cfg.extras, cfg.data
        self.every = int(x.eval_benchmark_steps)
        self.rank, self.world = trainer.args.process_index, trainer.args.world_size
        mine = lambda i: i % self.world == self.rank  # noqa: E731
        self.benches = [
            read_benchmark(p, keep_images=mine, limit=x.eval_benchmark_limit) for p in x.eval_benchmarks
        ]
        tok = trainer.processing_class
        settings = EvalSettings(
            max_new_tokens=x.eval_benchmark_max_new_tokens,
            batch_size=x.eval_benchmark_batch_size,
            max_dynamic_patch=d.max_dynamic_patch,
            min_dynamic_patch=d.min_dynamic_patch,
            use_thumbnail=d.use_thumbnail,
            mc_prompt=x.eval_benchmark_mc_prompt,
            open_prompt=x.eval_benchmark_open_prompt,
        )
        vision = VisionSpec.from_config(trainer.accelerator.unwrap_model(trainer.model).config)
        encoder = TemplateEncoder(tok, d.system_message, d.template)
        self.runner = BenchmarkRunner(tok, vision, encoder, settings)
        self.last_step: int | None = None

    def _run(self, state, model) -> None:
        if self.last_step == state.global_step:
            return
        self.last_step = state.global_step
        unwrapped = self.trainer.accelerator.unwrap_model(model if model is not None else self.trainer.model)
        synced = zero_stage(self.trainer) == 3
        logs: dict[str, float] = {}
        rows: list[dict[str, Any]] = []
        for bench in self.benches:
            metrics, bench_rows = evaluate(self.runner, unwrapped, bench, self.rank, self.world, synced)
            logs |= {f"bench/{bench.name}/{k}": v for k, v in metrics.items()}
            rows += [{"step": state.global_step, **r} for r in bench_rows]
        if state.is_world_process_zero:
            path = Path(self.trainer.args.output_dir) / BENCHMARKS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        log_from_callback(self.trainer, logs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and state.global_step % self.every == 0:
            self._run(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # A run stopped early (a signal, a stop request) leaves at once: no benchmark pass then.
        if state.max_steps <= 0 or state.global_step >= state.max_steps:
            self._run(state, model)


def finish_loggers() -> None:
    """Close the wandb run (flushes an offline run's files); call once training and eval are done."""
    import sys

    wandb = sys.modules.get("wandb")  # never import wandb just to find there is no run
    if wandb is not None and wandb.run is not None:
        wandb.finish()
