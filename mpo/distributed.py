"""DeepSpeed and multi-process glue: CPU launches, the reference model under ZeRO, rank helpers."""

from __future__ import annotations

import copy
import os

import torch


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def single_process_env(training: dict) -> None:
    """``python train/train_mpo.py ... training.deepspeed=X`` without a launcher: one process.

    DeepSpeed needs a process group even for one process; the launchers (deepspeed, torchrun)
    set RANK/WORLD_SIZE/MASTER_*. Without them, describe a world of one on this machine.
    """
    if not training.get("deepspeed") or "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def prepare_cpu_distributed(training: dict) -> None:
    """Make accelerate honour a ``deepspeed`` CLI launch on a machine without CUDA.

    Under ``Trainer(deepspeed=...)`` on CPU, accelerate ends up with one process and no backend
    (every rank thinks it is rank 0). Building the PartialState ourselves with gloo while
    ACCELERATE_USE_DEEPSPEED is set, then telling the Trainer to use that configured state, gives
    each rank its own identity (seen with accelerate 1.15 and DeepSpeed 0.19.8 on CPU).
    """
    if torch.cuda.is_available() or not training.get("deepspeed"):
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    config = dict(training.get("accelerator_config") or {})
    config["use_configured_state"] = True
    training["accelerator_config"] = config
    training["use_cpu"] = False  # the configured state decides the device


def deepspeed_stage(deepspeed: str | dict | None) -> int | None:
    """ZeRO stage of a ``training.deepspeed`` value (a JSON path or a dict); None without DeepSpeed."""
    import json
    from pathlib import Path

    if not deepspeed:
        return None
    config = deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text())
    return int(config.get("zero_optimization", {}).get("stage", 0))


def prepare_reference_for_deepspeed(ref_model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Frozen reference under DeepSpeed: sharded for inference under ZeRO-3, replicated otherwise.

    Under ZeRO-3 the reference is wrapped by ``deepspeed.initialize`` with no optimizer so its
    parameters stay partitioned like the policy's; under ZeRO-1/2 a plain frozen copy on the
    device is what DeepSpeed would keep anyway (ZeRO-1/2 only shard optimizer state and grads).
    """
    import deepspeed

    plugin = accelerator.state.deepspeed_plugin
    ds_config = copy.deepcopy(plugin.deepspeed_config)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        # DeepSpeed casts the policy to its compute dtype; the reference must match, or
        # π = πref at step 0 would not give zero log-ratios.
        dtype = (
            torch.bfloat16
            if ds_config.get("bf16", {}).get("enabled") is True
            else torch.float16
            if ds_config.get("fp16", {}).get("enabled") is True
            else None
        )
        return ref_model.to(device=accelerator.device, dtype=dtype)
    ds_config["zero_optimization"] = {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_prefetch_bucket_size": 0,
    }
    for key in ("optimizer", "scheduler"):
        ds_config.pop(key, None)
    ds_config.setdefault("train_micro_batch_size_per_gpu", 1)
    ds_config.pop("gradient_accumulation_steps", None)
    ds_config.pop("train_batch_size", None)
    engine, *_ = deepspeed.initialize(model=ref_model, config=ds_config)
    engine.eval()
    return engine
