"""MPOTrainer: ``transformers.Trainer`` with the MPO loss, a reference model and BCO's δ as state.

How one optimizer step runs, top to bottom (each override is short and named for its step):

1. ``get_batch_samples`` (once per optimizer step): the Trainer pulls the step's micro-batches;
   we all-reduce two numbers over ranks, the step's pairs and chosen-response tokens. They are the
   loss denominators, so the step's gradient is that of one mean over the whole global batch
   however it is split into ranks × accumulation steps × micro-batches, and whichever pairs were
   skipped.
2. ``compute_loss`` (per micro-batch):
   a. the collator's ``(batch, events)`` is unpacked; the events (skips, truncations) are added to
      ``data_events``; a rank whose pairs were all skipped runs ``_placeholder_batch`` so that
      data-parallel ranks run the same modules (ZeRO-3 gathers weights per module call);
   b. ``_pair_logps``: summed response log-probs of policy and reference (one vision pass per pair,
      LM head on response positions only: ``mpo.logprobs`` / ``mpo.shared_prompt``; the reference
      comes from the batch with ``reference=cache``);
   c. ``_update_delta`` (training only): δ ← running mean of every reward so far, all ranks, before
      the loss (one all-reduce);
   d. ``self.loss_fn(logps)``: per-pair terms (``mpo.loss.MPOLoss``), combined with the step's
      denominators (``_denominators``);
   e. ``MetricSums.add``: local sums of the logged metrics; ``log`` reduces them over ranks once
      per logging step and checks the bad-sample share there (on every rank at once).
3. The Trainer's backward and optimizer step; ``_save_checkpoint`` adds δ, the data events and the
   completion marker (``mpo.checkpoints``); ``train(resume_from_checkpoint=...)`` restores them.

Collectives per training micro-batch: the δ all-reduce, plus one LM-head-call count under
data parallelism; per optimizer step one more (denominators); per logging step one (metrics).

transformers workarounds, all in the section at the end of ``MPOTrainer`` and checked against
the pinned version by ``tests/test_trainer.py::test_workarounds_match_the_pinned_transformers``:
- ``_load_from_checkpoint``: the Trainer loads ``model.safetensors`` with a raw
  ``load_state_dict``, which misses every key of InternVL's -hf layout and keeps the current
  weights silently; we load through ``from_pretrained``'s key mapping.
- ``_save_checkpoint``: the Trainer rotates checkpoints before our completion marker exists and
  could delete the last complete one; rotation is ours, after the marker.
- ``_prepare_inputs``: under DeepSpeed the Trainer casts every float tensor to the compute dtype;
  cached reference log-probs must stay float64 (bf16 keeps 3 significant digits of a sum of −80).
- ``floating_point_ops`` / ``_track_num_input_tokens``: they read ``inputs["input_ids"]``; our
  inputs are ``(batch, events)``.
- ``_get_train_sampler`` returns a ``BatchRebalanceSampler`` subclass for packed batches
  (``mpo.packing.PackedBatchSampler``): the Trainer passes that type as the DataLoader's
  ``batch_sampler`` and leaves its per-rank split to it.
- ``model_accepts_loss_kwargs = False`` and ``loss_is_scaled_for_ga = False``: the Trainer must not
  count label tokens itself (it would do so only on ranks whose batch has labels, a hang) and must
  divide our per-micro-batch loss by the accumulation steps.
- CPU launches under the ``deepspeed`` CLI need accelerate's state built by hand
  (``mpo.distributed.prepare_cpu_distributed``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from mpo import checkpoints
from mpo.data.events import DataEvents, gather_events
from mpo.data.mmpr import DataError
from mpo.distributed import deepspeed_stage
from mpo.files import fsync_tree, write_atomic
from mpo.logprobs import batch_logps, lockstep_lm_head_calls, trained_positions
from mpo.loss import MPOLoss, PairLogps, PairTerms
from mpo.shared_prompt import packed_batch_logps

TESTED_TRANSFORMERS = "5.23."  # the workarounds above were read against this version
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist_ready():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def chosen_trained_tokens(batch: dict) -> int:
    """Trained tokens of the chosen answers of a collated pair batch: in the first ``num_pairs``
    rows of a padded batch, owned by sequences ``< num_pairs`` in a packed one (``mpo.packing``)."""
    n = batch.get("num_pairs") or 0
    if not n:
        return 0
    if "scored" in batch:
        return int((batch["scored"][:, 3] < n).sum())
    return int((batch["labels"][:n, 1:] != -100).sum())


class MetricSums:
    """Sums of the logged metrics over the pairs of one logging window, on this rank.

    ``reduce`` all-reduces them (one collective) and returns exact means over every pair of the
    window on every rank: a metric is not a mean of per-micro-batch means.
    """

    KEYS = (
        "loss/dpo", "loss/bco", "loss/sft", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
        "rewards/margins", "logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected",
    )  # fmt: skip
    COUNTS = ("pairs", "tokens", "seen", "bad")

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(len(self.KEYS) + len(self.COUNTS), dtype=torch.float64, device=device)

    def add(self, terms: PairTerms, logps: PairLogps) -> None:
        cr, rr = terms.chosen_rewards, terms.rejected_rewards
        values = [
            terms.preference, terms.quality, terms.sft, cr, rr, (cr > rr).float(), cr - rr,
            logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected,
        ]  # fmt: skip
        row = torch.stack([v.detach().double().sum().to(self.device) for v in values])
        self.sums[: len(self.KEYS)] += row
        self.sums[len(self.KEYS)] += logps.num_pairs
        self.sums[len(self.KEYS) + 1] += float(logps.chosen_tokens.sum())

    def add_events(self, events: DataEvents) -> None:
        self.sums[-2] += events.seen
        self.sums[-1] += events.bad

    def reduce(self, loss_fn: MPOLoss) -> tuple[dict[str, float], dict[str, float]]:
        """(metric means, window counts ``pairs``/``tokens``/``seen``/``bad``) over all ranks."""
        total = _all_reduce_sum(self.sums).tolist()
        counts = dict(zip(self.COUNTS, total[len(self.KEYS) :]))
        pairs = counts["pairs"]
        if not pairs:
            return {}, counts
        means = {k: v / pairs for k, v in zip(self.KEYS, total)}
        means["loss/sft"] = total[self.KEYS.index("loss/sft")] / loss_fn.sft_denominator(
            pairs, counts["tokens"]
        )
        c = loss_fn.cfg
        means["loss"] = (
            c.preference_weight * means["loss/dpo"]
            + c.quality_weight * means["loss/bco"]
            + c.generation_weight * means["loss/sft"]
        )
        return means, counts


class MetricsFileCallback(TrainerCallback):
    """Appends one JSON line per logging event to ``<output_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time()}
        for k, v in logs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            record[k] = v
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class MPOTrainer(Trainer):
    """Trains with ``w_p·L_p + w_q·L_q(δ) + w_g·L_g`` (see the module docstring for the step).

    Args:
        loss_fn: the MPO loss (owns δ), built from the ``loss`` config section.
        ref_model: frozen reference (``reference=copy``); None for ``lora_disabled`` (the policy
            with its adapters switched off) or ``cache`` (batches carry reference log-probs).
        reference: ``copy``, ``lora_disabled`` or ``cache``.
        logprob_chunk_size: response positions per LM-head call.
        shared_prompt: one LLM pass per pair over ``[prompt | chosen | rejected]``; needed for
            packed batches (``mpo.data.collate.PackedPairCollator``), which are laid out that way.
        train_lengths: estimated tokens per training pair, ``(N,)``, computed on first use; given,
            the train sampler groups pairs of similar length (``mpo.sampler``).
        max_bad_fraction: the share of bad training pairs that stops the run.
        max_tokens_per_batch: with ``train_lengths`` (packed lengths), training micro-batches are
            packed pairs under this token budget (``mpo.packing.PackedBatchSampler``).
        run_lock: the ``mpo.checkpoints.RunDirLock`` this run holds on its output dir (rank 0);
            released by ``release_run_dir`` (and at process exit).
    """

    def __init__(
        self,
        *args,
        loss_fn: MPOLoss,
        ref_model: torch.nn.Module | None = None,
        reference: str = "copy",
        logprob_chunk_size: int = 4096,
        shared_prompt: bool = False,
        train_lengths: Callable[[], np.ndarray] | None = None,
        max_bad_fraction: float = 1.0,
        max_tokens_per_batch: int | None = None,
        run_lock=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.run_lock = run_lock
        if run_lock is not None:
            import atexit

            atexit.register(run_lock.release)
        self.loss_fn = loss_fn
        self.reference = reference
        self.logprob_chunk_size = logprob_chunk_size
        # Same per-sequence log-probs either way: shared_prompt packs each pair's prompt once.
        self._logps = packed_batch_logps if shared_prompt else batch_logps
        self.max_tokens_per_batch = max_tokens_per_batch
        self.train_lengths = train_lengths
        self.max_bad_fraction = max_bad_fraction
        # Skips and truncations of the batches this rank consumed; the global seen/bad totals so far.
        self.data_events = {"train": DataEvents(), "eval": DataEvents()}
        self.global_seen_bad = [0.0, 0.0]
        self._step: dict[str, float] | None = None  # this optimizer step's denominators
        self._metrics = {split: MetricSums(self.args.device) for split in ("train", "eval")}
        self._throughput = {"tokens": 0, "pairs": 0, "since": time.perf_counter()}
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.ref_model = self._prepare_reference(ref_model) if reference == "copy" else ref_model
        self.add_callback(MetricsFileCallback(Path(self.args.output_dir) / "metrics.jsonl"))

    @property
    def reward_shift(self):
        return self.loss_fn.reward_shift

    # ---- 1. the optimizer step's denominators -------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        local = [sum(chosen_trained_tokens(b) for b, _ in batches), sum(b["num_pairs"] for b, _ in batches)]
        tokens, pairs = _all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.args.device))
        # Ranks' gradients are averaged and micro-batch losses divided by their number: dividing
        # each micro-batch's sums by (step total / (world × micro-batches)) gives the step mean.
        scale = self.args.world_size * max(len(batches), 1)
        self._step = {"tokens": max(float(tokens), 1.0) / scale, "pairs": max(float(pairs), 1.0) / scale}
        return batches, None

    # ---- 2. one micro-batch -------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch, events = inputs
        split = "train" if model.training else "eval"
        self.data_events[split].add(events)
        self._metrics[split].add_events(events)
        real = batch["num_pairs"] > 0
        if not real:
            batch = self._placeholder_batch()
        logps = self._pair_logps(model, batch)
        if split == "train":
            self._update_delta(logps, real)
        terms = self.loss_fn(logps)
        loss = self.loss_fn.combine(terms, *self._denominators(split, logps))
        if real:
            self._metrics[split].add(terms, logps)
            if split == "train":
                self._throughput["tokens"] += int(batch["attention_mask"].sum())
                self._throughput["pairs"] += logps.num_pairs
        else:
            loss = loss * 0  # through every module this rank ran, so its gradient hooks fire
        return (loss, None) if return_outputs else loss

    def _placeholder_batch(self) -> dict[str, torch.Tensor]:
        """One text pair with no trained token: what a rank runs when all its pairs were skipped."""
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        ids = torch.full((2, 2), int(pad or 0), dtype=torch.long, device=self.args.device)
        zeros = torch.zeros(1, dtype=torch.float64, device=self.args.device)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.full_like(ids, -100),
            "num_pairs": 1,
            "ref_chosen_logps": zeros,
            "ref_rejected_logps": zeros,
        }

    def _pair_logps(self, model, batch: dict) -> PairLogps:
        lockstep = _dist_ready()
        chunk = self.logprob_chunk_size
        calls = (
            lockstep_lm_head_calls(trained_positions(batch), chunk, self.args.device) if lockstep else None
        )
        with self.accelerator.autocast():  # bf16/fp16 without DeepSpeed: we call submodules directly
            policy = self._logps(self._policy(model), batch, chunk, lockstep, calls)
            ref_chosen, ref_rejected = self._reference_logps(model, batch, lockstep, calls)
        half = batch["num_pairs"]
        return PairLogps(
            policy_chosen=policy.logps[:half],
            policy_rejected=policy.logps[half:],
            ref_chosen=ref_chosen,
            ref_rejected=ref_rejected,
            chosen_tokens=policy.num_tokens[:half],
            rejected_tokens=policy.num_tokens[half:],
        )

    def _policy(self, model):
        unwrapped = self.accelerator.unwrap_model(model)
        # peft wraps the InternVL model; the forward needs InternVL's own modules.
        return unwrapped.base_model.model if hasattr(unwrapped, "disable_adapter") else unwrapped

    @torch.no_grad()
    def _reference_logps(self, model, batch, lockstep: bool, calls: int | None):
        """Reference log-probs of the chosen and rejected rows, ``(B,)`` each."""
        if self.reference == "cache":
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        chunk = self.logprob_chunk_size
        if self.reference == "lora_disabled":
            policy = self.accelerator.unwrap_model(model)
            was_training = policy.training
            with policy.disable_adapter():
                policy.eval()
                try:
                    return self._logps(policy.base_model.model, batch, chunk, lockstep, calls).split()
                finally:
                    policy.train(was_training)
        ref = self.ref_model.module if hasattr(self.ref_model, "module") else self.ref_model
        return self._logps(ref, batch, chunk, lockstep, calls).split()

    def _update_delta(self, logps: PairLogps, real: bool) -> None:
        """δ takes this micro-batch's rewards from every rank before the loss (paper §3.2; TRL 0.10's
        ``bco_pair`` running mean). A placeholder pair contributes no reward."""
        rewards = self.loss_fn.rewards(logps).double().to(self.args.device)
        stats = torch.stack([rewards.sum(), rewards.new_tensor(float(rewards.numel()))]) * float(real)
        total, count = _all_reduce_sum(stats).tolist()
        if count > 0:
            self.loss_fn.reward_shift.update(total, int(count))

    def _denominators(self, split: str, logps: PairLogps) -> tuple[float, float]:
        """(pairs, tokens) to divide this micro-batch's summed terms by: the optimizer step's
        (``get_batch_samples``) in training, this batch's own otherwise (evaluation, or a direct
        call). Evaluation logs exact means from ``MetricSums`` anyway."""
        if split == "train" and self._step is not None:
            return self._step["pairs"], self._step["tokens"]
        return float(max(logps.num_pairs, 1)), float(max(int(logps.chosen_tokens.sum()), 1))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _get_train_sampler(self, train_dataset=None):
        """The Trainer's sampler (or length-grouped batches), with the epoch in each index so
        per-sample random views (``data_augment``) are seeded by (sample, epoch)."""
        from mpo.sampler import EpochTaggedSampler, LengthGroupedPairSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.max_tokens_per_batch is not None:
            from mpo.packing import PackedBatchSampler  # yields epoch-tagged batches itself

            return PackedBatchSampler(
                self.train_lengths(), self.max_tokens_per_batch, seed=self.args.seed,
                num_replicas=self.args.world_size, rank=self.args.process_index,
            )  # fmt: skip
        if self.train_lengths is None:
            inner = super()._get_train_sampler(train_dataset)
            if isinstance(inner, torch.utils.data.RandomSampler):
                # What accelerate would swap in had it seen the RandomSampler (our wrapper hides
                # it): an order drawn from (seed, epoch), the same on every rank and on resume.
                from accelerate.data_loader import SeedableRandomSampler

                inner = SeedableRandomSampler(data_source=dataset, data_seed=self.args.data_seed)
        else:
            inner = LengthGroupedPairSampler(
                self.train_lengths(), self.args.per_device_train_batch_size, seed=self.args.seed
            )
        return EpochTaggedSampler(inner, len(dataset))

    # ---- logging: metrics reduced once per logging step ---------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            split, prefix = "train", ""
        elif any(k.startswith("eval_") for k in logs):
            split, prefix = "eval", "eval_"
        else:  # the train-end summary (train_runtime, ...): nothing of ours to add
            return super().log(logs, start_time)
        means, counts = self._metrics[split].reduce(self.loss_fn)  # collective: every rank logs
        self._metrics[split] = MetricSums(self.args.device)
        for k, v in means.items():
            if k != "loss" or split == "eval":  # the train loss is the Trainer's own (of the steps)
                logs[prefix + k] = v
        if split == "eval" and not means:
            logs["eval_loss"] = float("nan")  # no usable held-out pair
        logs[prefix + "bco/delta"] = self.loss_fn.delta
        logs[prefix + "bco/num_rewards"] = self.loss_fn.reward_shift.count
        if split == "train":
            self._check_bad_fraction(counts)
            now = time.perf_counter()
            elapsed = max(now - self._throughput["since"], 1e-9)
            logs["tokens_per_s"] = self._throughput["tokens"] * self.args.world_size / elapsed
            logs["pairs_per_s"] = self._throughput["pairs"] * self.args.world_size / elapsed
            self._throughput = {"tokens": 0, "pairs": 0, "since": now}
        super().log(logs, start_time)

    def _check_bad_fraction(self, window: dict[str, float]) -> None:
        """Stop (on every rank: the counts are global) once bad pairs exceed ``max_bad_fraction``
        of those read, judged after ``min(len(train data), 100)`` pairs."""
        self.global_seen_bad[0] += window["seen"]
        self.global_seen_bad[1] += window["bad"]
        seen, bad = self.global_seen_bad
        total = DataEvents(seen=int(seen), bad=int(bad))
        problem = total.bad_fraction_problem(self.max_bad_fraction, min(len(self.train_dataset), 100))
        if problem:
            mine = self.data_events["train"]
            raise DataError(
                f"{problem.split('; skips by reason')[0]}; on this rank: skips {dict(mine.skipped)}, "
                f"first: {mine.first_examples()}"
            )

    # ---- state: δ and data events in every checkpoint -----------------------------------------
    def release_run_dir(self) -> None:
        """Give up the output dir's lock (the run is over)."""
        if self.run_lock is not None:
            self.run_lock.release()

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        ckpt = run_dir / f"checkpoint-{self.state.global_step}"
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as exc:
            if checkpoints.is_disk_full(exc, ckpt):
                raise checkpoints.CheckpointError(
                    f"No space left on device while writing {ckpt} ({type(exc).__name__}: {exc}). This "
                    "partial checkpoint is never resumed from; free space (or move training.output_dir) and "
                    "resume with training.resume_from_checkpoint=latest"
                ) from exc
            raise
        finally:
            self.args.save_total_limit = limit
        data_events = gather_events(self.data_events["train"])  # collective: every rank saves
        if ckpt.is_dir():
            fsync_tree(ckpt)  # each rank flushes what it wrote (ZeRO shards included)
        if _dist_ready():
            dist.barrier()  # every rank's shards are on disk before the checkpoint is marked complete
        if self.args.should_save:
            state = {
                "reward_shift": self.loss_fn.reward_shift.state_dict(),
                "world_size": self.args.world_size,
                "zero_stage": deepspeed_stage(self.args.deepspeed),
                "data_events": data_events.to_dict(),
            }
            write_atomic(ckpt / checkpoints.MPO_STATE_NAME, json.dumps(state))
            # Written last, with every file's size and checksum: a checkpoint without it is
            # incomplete and never resumed from; one whose files changed since is refused.
            checkpoints.write_complete_marker(ckpt, self.state.global_step)
            checkpoints.rotate_complete_checkpoints(run_dir, limit)
        if _dist_ready():
            dist.barrier()

    def load_mpo_state(self, checkpoint: str | os.PathLike) -> None:
        path = Path(checkpoint) / checkpoints.MPO_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{checkpoint}: no {checkpoints.MPO_STATE_NAME}; not a checkpoint written by internvl-mpo"
            )
        state = json.loads(path.read_text())
        problem = checkpoints.setup_mismatch(checkpoint, state, self.args)
        if problem:
            raise ValueError(
                problem
                + " Consolidate the weights (`mpo consolidate CKPT OUT`) to start a new run from them."
            )
        self.loss_fn.reward_shift.load_state_dict(state["reward_shift"])
        saved = DataEvents.from_dict(state.get("data_events", {}))
        self.global_seen_bad = [float(saved.seen), float(saved.bad)]
        # The checkpoint holds the all-rank total: one rank carries it on, the others start at 0.
        self.data_events["train"] = saved if self.args.process_index == 0 else DataEvents()

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint:
            self.load_mpo_state(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._step = None  # later compute_loss calls are not part of an optimizer step

    def evaluate(self, *args, **kwargs):
        self.data_events["eval"] = DataEvents()  # the report describes one pass over the eval data
        return super().evaluate(*args, **kwargs)

    def total_data_events(self, split: str = "train") -> DataEvents:
        """``split``'s events summed over ranks (collective: call on every rank)."""
        return gather_events(self.data_events[split])

    def _prepare_reference(self, ref_model: torch.nn.Module | None) -> torch.nn.Module:
        if ref_model is None:
            raise ValueError("reference=copy needs a ref_model")
        ref_model.eval()
        ref_model.requires_grad_(False)
        if self.is_deepspeed_enabled:
            from mpo.distributed import prepare_reference_for_deepspeed

            return prepare_reference_for_deepspeed(ref_model, self.accelerator)
        return ref_model.to(self.args.device)

    # ---- transformers workarounds (see the module docstring) ----------------------------------
    def _prepare_inputs(self, inputs):
        batch, events = inputs
        ref = {k: batch.pop(k) for k in REF_KEYS if k in batch}
        batch = super()._prepare_inputs(batch)
        batch.update({k: v.to(self.args.device) for k, v in ref.items()})  # float64 kept
        return batch, events

    def floating_point_ops(self, inputs) -> int:
        return super().floating_point_ops(inputs[0])

    def _track_num_input_tokens(self, inputs) -> None:
        if "input_ids" in inputs[0]:
            super()._track_num_input_tokens(inputs[0])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint's weights through ``from_pretrained``'s key mapping; strict loading
        then guarantees every parameter came from the checkpoint."""
        model = model if model is not None else self.model
        target = self.accelerator.unwrap_model(model)
        if hasattr(target, "disable_adapter") or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
