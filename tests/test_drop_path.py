"""ViT drop path (stochastic depth) in the policy only, in training only, and exact on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train import StopAfter, _train_logs  # tests/ is on sys.path under pytest

from mpo.model.drop_path import DropPathVisionLayer, apply_vision_drop_path, drop_path
from mpo.run import build_trainer


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    x = torch.rand(20_000, 3, 4) + 0.5
    assert drop_path(x, 0.0, True) is x and drop_path(x, 0.3, False) is x
    torch.manual_seed(0)
    y = drop_path(x, 0.3, True)
    kept = (y != 0).all(dim=(1, 2))
    dropped = (y == 0).all(dim=(1, 2))
    assert bool((kept | dropped).all())  # per sample: all or nothing
    torch.testing.assert_close(y[kept], x[kept] / 0.7, rtol=0, atol=0)
    # Bernoulli(0.3) over 20,000 samples: the dropped share is within 5 σ = 5·√(0.3·0.7/20000) ≈ 0.016.
    assert abs(dropped.float().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 20_000)


def test_rates_rise_linearly_and_eval_is_the_native_layer(tiny_model_dir):
    from mpo.model.loading import load_model

    plain = load_model(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    assert apply_vision_drop_path(model, 0.0) == [] and not isinstance(
        model.model.vision_tower.encoder.layer[0], DropPathVisionLayer
    )
    rates = apply_vision_drop_path(model, 0.1)
    assert rates == pytest.approx([0.0, 0.1])  # the tiny ViT has 2 layers: linspace(0, 0.1, 2)
    assert all(isinstance(layer, DropPathVisionLayer) for layer in model.model.vision_tower.encoder.layer)
    assert model.state_dict().keys() == plain.state_dict().keys()
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        # Eval mode: the same arithmetic as the native layer, bit for bit.
        assert torch.equal(
            model.model.get_image_features(pixel_values=pixels).pooler_output,
            plain.model.get_image_features(pixel_values=pixels).pooler_output,
        )


def _features(model, pixels, training: bool) -> torch.Tensor:
    model.train(training)
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=pixels).pooler_output


def test_policy_only_and_training_only(tiny_config):
    trainer, _ = build_trainer(tiny_config("model.vision_drop_path_rate=0.9"))
    policy, reference = trainer.model, trainer.ref_model
    assert isinstance(policy.model.vision_tower.encoder.layer[-1], DropPathVisionLayer)
    assert not any(isinstance(m, DropPathVisionLayer) for m in reference.modules())
    pixels = torch.randn(6, 3, 64, 64)
    a, b = _features(policy, pixels, True), _features(policy, pixels, True)
    assert not torch.equal(a, b)  # two training forwards draw different masks
    evaluated = _features(policy, pixels, False)
    assert torch.equal(evaluated, _features(policy, pixels, False))
    assert torch.equal(evaluated, _features(reference, pixels, False))  # same weights before training


@pytest.mark.slow
def test_resume_is_exact_with_drop_path_and_data_augment(tiny_config, demo_data, tmp_path):
    """Both random views on: the uninterrupted run and a run stopped at its step-2 checkpoint and
    resumed give identical losses and δ at steps 3-4 (same machine: bit for bit)."""
    spec = next(iter(json.loads(Path(demo_data["train"]).read_text()).values()))
    root = Path(demo_data["train"]).parent
    meta = tmp_path / "augmented.json"
    meta.write_text(json.dumps({"aug": {**spec, "root": str(root), "annotation": str(root / spec["annotation"]),
                                        "data_augment": True}}))  # fmt: skip
    common = [f"data.meta_path={meta}", "data.eval_meta_path=null", "model.vision_drop_path_rate=0.5"]
    full_cfg = tiny_config(*common, f"training.output_dir={tmp_path / 'full'}")
    build_trainer(full_cfg)[0].train()
    part, _ = build_trainer(tiny_config(*common, f"training.output_dir={tmp_path / 'part'}"))
    part.add_callback(StopAfter(2))
    part.train()
    resumed, resume = build_trainer(
        tiny_config(
            *common, f"training.output_dir={tmp_path / 'part'}", "training.resume_from_checkpoint=latest"
        )
    )
    assert resume.endswith("checkpoint-2")
    resumed.train(resume_from_checkpoint=resume)
    full, again = _train_logs(tmp_path / "full"), _train_logs(tmp_path / "part")
    for step in (3, 4):
        assert again[step]["loss"] == full[step]["loss"], step
        assert again[step]["bco/delta"] == full[step]["bco/delta"], step
    # The control: without drop path the losses differ, so the random views did act.
    plain = tiny_config(
        f"data.meta_path={meta}", "data.eval_meta_path=null", f"training.output_dir={tmp_path / 'p'}"
    )
    build_trainer(plain)[0].train()
    assert _train_logs(tmp_path / "p")[3]["loss"] != full[3]["loss"]
