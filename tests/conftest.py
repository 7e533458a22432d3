"""Shared fixtures: a tiny InternVL + tokenizer and demo data, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _private_mpo_cache(tmp_path_factory):
    """Length indexes built by the tests go to a throwaway folder, never the user's cache."""
    os.environ["MPO_CACHE"] = str(tmp_path_factory.mktemp("mpo-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """HF-format tiny InternVL (seed 0) with its tokenizer."""
    from mpo.model.tiny import save_tiny_internvl

    return save_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl"))


@pytest.fixture(scope="session")
def tokenizer():
    from mpo.model.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Small demo MMPR data: {'train': meta path, 'eval': meta path}."""
    from mpo.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo"), n_train=64, n_eval=16)


@pytest.fixture
def tiny_config(tiny_model_dir, demo_data, tmp_path):
    """An ExperimentConfig for a few CPU steps on the tiny model; override via ``load_config`` args."""
    from mpo.config import load_config

    def make(*overrides: str):
        base = [
            f"model.path={tiny_model_dir}",
            f"data.meta_path={demo_data['train']}",
            f"data.eval_meta_path={demo_data['eval']}",
            f"training.output_dir={tmp_path / 'run'}",
            "training.max_steps=4",
            "training.per_device_train_batch_size=2",
            "training.learning_rate=1e-3",
            "training.logging_steps=1",
            "training.save_steps=2",
            "training.use_cpu=true",
            "training.report_to=none",
            "training.disable_tqdm=true",
        ]
        return load_config(None, base + list(overrides))

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped (with the reason) on machines without one."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
