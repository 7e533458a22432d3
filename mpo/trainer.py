"""MPOTrainer: transformers.Trainer with the MPO loss, a reference model and BCO's δ as state."""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from mpo.data.events import EVENTS_KEY, DataEvents, gather_events, pair_dataset_of
from mpo.logprobs import batch_logps
from mpo.loss import LossWeights, RewardShift, mpo_loss
from mpo.shared_prompt import shared_prompt_batch_logps

MPO_STATE_NAME = "mpo_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _chosen_trained_tokens(batch: dict) -> int:
    """Trained tokens in the chosen rows (the first ``num_pairs``) of a collated pair batch."""
    n = batch.get("num_pairs") or 0
    if not n:
        return 0
    return int((batch["labels"][:n, 1:] != -100).sum())


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist_ready():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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
    """Trains with ``w_p·L_p + w_q·L_q(δ) + w_g·L_g`` (see ``mpo.loss``).

    Args:
        ref_model: frozen reference (``reference=copy``); None for ``lora_disabled`` (the policy
            with its adapters switched off) or ``cache`` (batches carry reference log-probs).
        loss_weights: the MPO loss settings.
        reference: ``copy``, ``lora_disabled`` or ``cache``.
        logprob_chunk_size: response positions per LM-head call.
        group_by_length: batch pairs of similar estimated length (``mpo.sampler``).
        shared_prompt: one LLM pass per pair over ``[prompt | chosen | rejected]``.
    """

    def __init__(
        self,
        *args,
        ref_model: torch.nn.Module | None = None,
        loss_weights: LossWeights | None = None,
        reference: str = "copy",
        logprob_chunk_size: int = 4096,
        group_by_length: bool = False,
        shared_prompt: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.group_by_length = group_by_length
        # Both compute per-sequence log-probs of the same rows; shared_prompt packs each pair's
        # prompt once (mpo.shared_prompt), batch_logps runs chosen and rejected rows separately.
        self._logps = shared_prompt_batch_logps if shared_prompt else batch_logps
        self.loss_weights = loss_weights or LossWeights()
        self.reference = reference
        self.logprob_chunk_size = logprob_chunk_size
        self.reward_shift = RewardShift()
        # Skips and truncations of the batches this rank consumed (mpo.data.events).
        self.data_events = {"train": DataEvents(), "eval": DataEvents()}
        self._sft_window: dict[str, float] | None = None  # set per optimizer step (get_batch_samples)
        # Our compute_loss takes no token count from the Trainer (get_batch_samples makes its own):
        # this also keeps the Trainer from gathering one only on ranks whose batch has labels.
        self.model_accepts_loss_kwargs = False
        self._stored: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._throughput = {"tokens": 0, "pairs": 0, "since": time.perf_counter()}
        # compute_loss returns a per-micro-batch mean: let the Trainer divide by accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.ref_model = ref_model
        if reference == "copy":
            if ref_model is None:
                raise ValueError("reference=copy needs a ref_model")
            self.ref_model = self._prepare_reference(ref_model)
        self.add_callback(MetricsFileCallback(Path(self.args.output_dir) / "metrics.jsonl"))

    def _get_train_sampler(self, train_dataset=None):
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        from mpo.sampler import LengthGroupedPairSampler, pair_lengths

        ds = train_dataset if train_dataset is not None else self.train_dataset
        lengths = pair_lengths(pair_dataset_of(ds))
        return LengthGroupedPairSampler(lengths, self.args.per_device_train_batch_size, seed=self.args.seed)

    # ---- reference model -------------------------------------------------------------------
    def _prepare_reference(self, ref_model: torch.nn.Module) -> torch.nn.Module:
        ref_model.eval()
        ref_model.requires_grad_(False)
        if self.is_deepspeed_enabled:
            from mpo.distributed import prepare_reference_for_deepspeed

            return prepare_reference_for_deepspeed(ref_model, self.accelerator)
        return ref_model.to(self.args.device)

    @torch.no_grad()
    def reference_logps(self, model, inputs, lockstep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the chosen and rejected rows, ``(B,)`` each."""
        if self.reference == "cache":
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.reference == "lora_disabled":
            policy = self.accelerator.unwrap_model(model)
            with policy.disable_adapter():
                was_training = policy.training
                policy.eval()
                try:
                    out = self._logps(
                        policy.base_model.model, inputs, self.logprob_chunk_size, lockstep=lockstep
                    )
                finally:
                    policy.train(was_training)
            return out.split()
        ref = self.ref_model.module if hasattr(self.ref_model, "module") else self.ref_model
        return self._logps(ref, inputs, self.logprob_chunk_size, lockstep=lockstep).split()

    # ---- loss ------------------------------------------------------------------------------
    def _policy(self, model):
        unwrapped = self.accelerator.unwrap_model(model)
        # peft wraps the InternVL model; the forward needs InternVL's own modules.
        return unwrapped.base_model.model if hasattr(unwrapped, "disable_adapter") else unwrapped

    def _placeholder_batch(self) -> dict[str, torch.Tensor]:
        """One text pair with no trained token: what a rank runs when all its pairs were skipped."""
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        device = self.args.device
        ids = torch.full((2, 2), int(pad or 0), dtype=torch.long, device=device)
        zeros = torch.zeros(1, dtype=torch.float64, device=device)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.full_like(ids, -100),
            "num_pairs": 1,
            "ref_chosen_logps": zeros,
            "ref_rejected_logps": zeros,
        }

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The optimizer step's micro-batches, and the loss denominators: chosen-response tokens
        and pairs over the whole step (every micro-batch on every rank), so ``L_g`` is one token
        mean and ``L_p``, ``L_q`` one pair mean however the global batch is split into ranks and
        accumulation steps, and whichever pairs were skipped."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.tensor(
            [sum(_chosen_trained_tokens(b) for b in batches), sum(b.get("num_pairs") or 0 for b in batches)],
            dtype=torch.float64,
            device=self.args.device,
        )
        tokens, pairs = _all_reduce_sum(counts).tolist()
        self._sft_window = {"tokens": tokens, "pairs": pairs, "micro_batches": max(len(batches), 1)}
        return batches, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        train_eval = "train" if model.training else "eval"
        self.data_events[train_eval].add(inputs.pop(EVENTS_KEY, None))
        # Data-parallel ranks must run the same modules and collectives in the same order, even
        # when this rank's pairs were all skipped (ZeRO-3 gathers weights per module call).
        lockstep = _dist_ready()
        real = bool(inputs.get("num_pairs"))
        if not real:
            inputs = self._placeholder_batch()
        with self.accelerator.autocast():  # bf16/fp16 without DeepSpeed: we call submodules directly
            out = self._logps(self._policy(model), inputs, self.logprob_chunk_size, lockstep=lockstep)
            ref_chosen, ref_rejected = self.reference_logps(model, inputs, lockstep)
        chosen_logps, rejected_logps = out.split()
        half = chosen_logps.shape[0]
        beta = self.loss_weights.beta
        if train_eval == "train":
            # δ is updated with this micro-batch's rewards from every rank before the loss (facts §5).
            rewards = beta * torch.cat([chosen_logps - ref_chosen, rejected_logps - ref_rejected]).detach()
            count = rewards.numel() if real else 0
            stats = _all_reduce_sum(
                torch.stack(
                    [
                        rewards.double().sum() * float(real),
                        torch.tensor(count, dtype=torch.float64, device=rewards.device),
                    ]
                )
            )
            if stats[1].item() > 0:
                self.reward_shift.update(stats[0].item(), int(stats[1].item()))
        delta = self.reward_shift.value
        chosen_nll = -chosen_logps
        chosen_tokens = out.num_tokens[:half]
        world = dist.get_world_size() if _dist_ready() else 1
        window = self._sft_window if train_eval == "train" else None
        sft_denominator = pair_denominator = None
        if window is not None:
            # Ranks' gradients are averaged and micro-batch losses divided by their number: these
            # denominators make the step's gradient that of Σ over its pairs / tokens.
            scale = world * window["micro_batches"]
            sft_denominator, pair_denominator = window["tokens"] / scale, window["pairs"] / scale
        elif lockstep:
            counts = torch.stack(
                [
                    chosen_tokens.sum().to(torch.float64) * float(real),
                    torch.tensor(float(half * real), dtype=torch.float64, device=chosen_tokens.device),
                ]
            )
            tokens, pairs = (_all_reduce_sum(counts) / world).tolist()
            sft_denominator, pair_denominator = tokens, pairs
        if sft_denominator is not None:
            sft_denominator = torch.as_tensor(sft_denominator, dtype=chosen_nll.dtype).clamp(min=1e-9)
            pair_denominator = max(pair_denominator, 1e-9)
        loss, metrics = mpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            chosen_nll,
            chosen_tokens,
            delta,
            self.loss_weights,
            sft_denominator,
            rejected_num_tokens=out.num_tokens[half:],
            pair_denominator=pair_denominator,
        )
        self._store_metrics(metrics, train_eval, real)
        if not real:
            if train_eval == "eval" and not lockstep:
                # Nothing to evaluate in this batch: NaN is left out of eval_loss (logging_nan_inf_filter).
                loss = torch.full_like(loss, float("nan"))
            else:
                # Contributes 0 to the ranks' mean, still through every module this rank ran, so
                # its gradient hooks fire.
                loss = loss * 0
        elif train_eval == "train":
            self._throughput["tokens"] += int(inputs["attention_mask"].sum())
            self._throughput["pairs"] += half
        return (loss, metrics) if return_outputs else loss

    def _store_metrics(self, metrics: dict[str, torch.Tensor], train_eval: str, real: bool = True) -> None:
        """Mean over the ranks that had pairs (every rank joins the all-reduce)."""
        keys = sorted(metrics)
        device = metrics[keys[0]].device
        flag = torch.tensor(float(real), device=device)
        vec = torch.stack([metrics[k].detach().float() * flag for k in keys] + [flag])
        if _dist_ready():
            vec = _all_reduce_sum(vec.to(self.args.device))
        if vec[-1].item() == 0:
            return
        for k, v in zip(keys, (vec[:-1] / vec[-1]).tolist()):
            self._stored[train_eval][k].append(v)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            train_eval = "train"
        elif any(k.startswith("eval_") for k in logs):
            train_eval = "eval"
        else:  # train-end summary (train_runtime, ...): nothing of ours to add
            return super().log(logs, start_time)
        prefix = "" if train_eval == "train" else "eval_"
        for k, vals in self._stored[train_eval].items():
            if vals:
                logs[prefix + k] = sum(vals) / len(vals)
        self._stored[train_eval].clear()
        logs[prefix + "bco/delta"] = self.reward_shift.value
        if train_eval == "train":
            now = time.perf_counter()
            elapsed = max(now - self._throughput["since"], 1e-9)
            world = dist.get_world_size() if _dist_ready() else 1
            logs["tokens_per_s"] = self._throughput["tokens"] * world / elapsed
            logs["pairs_per_s"] = self._throughput["pairs"] * world / elapsed
            self._throughput = {"tokens": 0, "pairs": 0, "since": now}
        super().log(logs, start_time)

    # ---- state: δ in every checkpoint ----------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        # Rotation is ours: transformers rotates before our completion marker exists, which could
        # delete the last complete checkpoint while the new one is still unfinished.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = Path(self._get_output_dir(trial=trial))
        ckpt = run_dir / f"checkpoint-{self.state.global_step}"
        data_events = gather_events(self.data_events["train"])  # collective: every rank saves
        if ckpt.is_dir():
            _fsync_tree(ckpt)  # each rank flushes what it wrote (ZeRO shards included)
        if _dist_ready():
            dist.barrier()  # every rank's ZeRO shards are on disk before the checkpoint is marked complete
        if self.args.should_save:
            from mpo.distributed import deepspeed_stage

            state = {
                "reward_shift": self.reward_shift.state_dict(),
                "world_size": self.args.world_size,
                "zero_stage": deepspeed_stage(self.args.deepspeed),
                "data_events": data_events.to_dict(),
            }
            _write_atomic(ckpt / MPO_STATE_NAME, json.dumps(state))
            # Written last: a checkpoint without it is incomplete and never resumed from.
            _write_atomic(
                ckpt / COMPLETE_MARKER, json.dumps({"step": self.state.global_step, "time": time.time()})
            )
            rotate_complete_checkpoints(run_dir, limit)
        if _dist_ready():
            dist.barrier()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint's weights through ``from_pretrained``'s key mapping.

        transformers 5.23's Trainer loads ``model.safetensors`` with a raw ``load_state_dict``,
        but ``save_pretrained`` writes InternVL in the -hf key layout (``vision_tower.*``, not
        ``model.vision_tower.*``), so every key misses and resume silently keeps the current
        weights. Loading through the model class applies the mapping; strict loading then
        guarantees every parameter came from the checkpoint.
        """
        model = model if model is not None else self.model
        target = self.accelerator.unwrap_model(model)
        if hasattr(target, "disable_adapter") or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def load_mpo_state(self, checkpoint: str | os.PathLike) -> None:
        path = Path(checkpoint) / MPO_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{checkpoint}: no {MPO_STATE_NAME}; not a checkpoint written by internvl-mpo"
            )
        state = json.loads(path.read_text())
        problem = setup_mismatch(checkpoint, state, self.args)
        if problem:
            raise ValueError(
                problem
                + " Consolidate the weights (`mpo consolidate CKPT OUT`) to start a new run from them."
            )
        self.reward_shift.load_state_dict(state["reward_shift"])
        # The checkpoint holds the all-rank total: one rank carries it on, the others start at 0.
        self.data_events["train"] = (
            DataEvents.from_dict(state.get("data_events", {}))
            if self.args.process_index == 0
            else DataEvents()
        )

    def evaluate(self, *args, **kwargs):
        self.data_events["eval"] = DataEvents()  # the report describes one pass over the eval data
        return super().evaluate(*args, **kwargs)

    def total_data_events(self, split: str = "train") -> DataEvents:
        """``split``'s events summed over ranks (collective: call on every rank)."""
        return gather_events(self.data_events[split])

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint:
            self.load_mpo_state(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._sft_window = None  # later compute_loss calls are not part of an optimizer step


def setup_mismatch(checkpoint, state: dict, args) -> str | None:
    """Why ``checkpoint`` (its ``mpo_state.json`` as ``state``) cannot resume exactly under
    ``args``'s processes and ZeRO stage, or None. The data position (batches to skip per rank)
    and the stored optimizer partitions both depend on them."""
    from mpo.distributed import deepspeed_stage

    saved_world = state.get("world_size", 1)
    if saved_world != args.world_size:
        return (
            f"{checkpoint} was written by {saved_world} process(es) but this run has {args.world_size}: "
            "relaunch with the original number."
        )
    stage = deepspeed_stage(args.deepspeed)
    if "zero_stage" in state and state["zero_stage"] != stage:
        name = lambda s: "no DeepSpeed" if s is None else f"ZeRO-{s}"  # noqa: E731
        return (
            f"{checkpoint} was written under {name(state['zero_stage'])} but this run uses {name(stage)}: "
            "its optimizer state is stored for that setup."
        )
    return None


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders) to disk: the completion marker must
    not reach the disk before the weights and optimizer state do (a power cut, not just a kill)."""
    for path in sorted(folder.rglob("*")) + [folder]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems refuse fsync on folders
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write-then-rename, so a crash or a full disk never leaves a half-written file under ``path``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every ``checkpoint-N`` folder, oldest first."""
    found = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit():
                found.append((int(p.name[11:]), p, (p / COMPLETE_MARKER).is_file()))
    return sorted(found)


def rotate_complete_checkpoints(run_dir: Path, limit: int | None) -> list[Path]:
    """Keep the newest ``limit`` complete checkpoints; drop older ones and stale incomplete ones.

    Never deletes the newest complete checkpoint, and never an incomplete folder newer than it
    (it may be a save still in progress on another process). Returns the deleted folders.
    """
    import shutil

    if not limit:
        return []
    ckpts = list_checkpoints(run_dir)
    complete = [c for c in ckpts if c[2]]
    if not complete:
        return []
    newest = complete[-1][0]
    keep = {c[0] for c in complete[-max(limit, 1) :]}
    deleted = []
    for step, path, _done in ckpts:
        if step in keep or step > newest:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Newest ``checkpoint-N`` folder of ``output_dir`` that carries the completion marker."""
    complete = [path for _, path, done in list_checkpoints(Path(output_dir)) if done]
    return str(complete[-1]) if complete else None
