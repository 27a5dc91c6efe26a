"""The LoRA trainer of flux-mini (fluxspace/mini/train_lora.py) and the LoRA it ships.

A few steps on a small random Flux lower the loss and write a file that flux_core.lora reads back in
the official form; bad options are refused with one line; the shipped LoRA targets flux-mini and
changes its images at strength 1 and not one bit at strength 0.
"""

import json
import math

import numpy as np
import pytest
import torch
from test_mini_train import SMALL_FLUX, flow_data, logged

from flux_core.lora import LoraLinear, fuse, linear_shapes, read_lora, updates_for
from flux_core.model import Flux
from fluxspace import SampleSettings, generate, load_models
from fluxspace.mini.loras import PIXEL, pixel_score, pixelate, shipped_lora
from fluxspace.mini.train import TrainConfig
from fluxspace.mini.train_lora import (
    LoraConfig,
    main,
    resolve_targets,
    save_lora,
    target_patterns,
    train_lora,
)


def small_flow(seed: int = 0) -> Flux:
    # PyTorch's default init (not adaLN-Zero): every block already acts, so its LoRA gets gradients.
    torch.manual_seed(seed)
    return Flux(SMALL_FLUX)


def test_training_lowers_the_loss_and_writes_an_official_lora(tmp_path):
    flow = small_flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    latents, bank = flow_data()
    targets = ("double_blocks.*.img_mlp.2", "single_blocks.*.linear2", "final_layer.linear")
    lora = LoraConfig(rank=2, alpha=4.0, targets=targets)
    config = TrainConfig(steps=40, batch_size=8, lr=3e-2, log_every=1, seed=3)
    run, shapes = train_lora(flow, latents, bank, lora, config, tmp_path / "work", progress=False)
    losses = logged(tmp_path / "work")
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:5]), losses
    # The base model is untouched and carries no LoRA module after training.
    assert not any(isinstance(m, LoraLinear) for m in flow.modules())
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
    assert list(shapes) == ["double_blocks.0.img_mlp.2", "single_blocks.0.linear2", "final_layer.linear"]

    path = save_lora(tmp_path / "style.safetensors", run.ema, {"rank": 2, "alpha": 4.0, "steps": run.step, "seed": 3})
    read = read_lora(path)
    assert read.format == "bfl" and read.ranks() == [2] and read.alphas() == []  # alpha folded into lora_B
    assert read.targets("flow") == sorted(shapes)
    assert read.metadata["format"] == "flux-mini LoRA"
    assert json.loads(read.metadata["steps"]) == 40 and json.loads(read.metadata["alpha"]) == 4.0
    updates = updates_for(read, "flow", linear_shapes(flow))
    name = "double_blocks.0.img_mlp.2"
    key = name.replace(".", "__")
    assert torch.equal(updates[name].down, run.ema.down[key].detach())
    assert torch.allclose(updates[name].up, run.ema.up[key].detach() * 4.0 / 2)
    assert updates[name].up.abs().max() > 0  # B left zero would be no LoRA at all


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    latents, bank = flow_data()
    lora = LoraConfig(rank=2, alpha=2.0, targets=("single_blocks.*.linear1",))
    config = TrainConfig(steps=6, batch_size=4, lr=1e-2, seed=1)
    whole, _ = train_lora(small_flow(), latents, bank, lora, config, tmp_path / "a", progress=False)
    train_lora(small_flow(), latents, bank, lora, config, tmp_path / "b", progress=False, stop_at=3)
    split, _ = train_lora(small_flow(), latents, bank, lora, config, tmp_path / "b", resume=True, progress=False)
    for (k, a), b in zip(whole.ema.state_dict().items(), split.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"alpha": math.nan}, "alpha must be a finite number"),
        ({"alpha": math.inf}, "alpha must be a finite number"),
        ({"targets": ()}, "targets is empty"),
    ],
)
def test_bad_lora_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_an_unknown_target_lists_the_valid_ones():
    flow = small_flow()
    with pytest.raises(ValueError, match=r"'double_blocks.\*.attn.qkv' matches no Linear") as info:
        resolve_targets(flow, ("double_blocks.*.attn.qkv",))
    assert "double_blocks.*.img_attn.qkv" in str(info.value) and "\n" not in str(info.value)
    assert "single_blocks.*.linear1" in target_patterns(linear_shapes(flow))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rank", "0"], "train_lora: rank must be an integer >= 1; got 0"),
        (["--steps", "0"], "train_lora: steps and batch_size must be >= 1"),
        (["--alpha", "nan"], "train_lora: alpha must be a finite number; got nan"),
        (["--style", "cubist"], "unknown style 'cubist'; valid: pixel"),
        (["--targets", "double_blocks.*.norm"], "matches no Linear of the model; valid: double_blocks.*.img_attn.proj"),
    ],
)
def test_the_command_refuses_bad_options_in_one_line(tmp_path, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "x.safetensors"), *argv])
    text = str(info.value)
    assert message in text and "\n" not in text
    assert not (tmp_path / "x.safetensors").exists()


def test_pixel_style_and_its_score():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    blocks = pixelate(x)
    assert torch.equal(blocks[..., ::PIXEL, ::PIXEL], blocks[..., 1::PIXEL, 1::PIXEL])
    assert torch.allclose(pixel_score(blocks), torch.ones(2))
    assert pixel_score(x).abs().max() < 0.2  # noise: no step is special


def test_shipped_lora_changes_flux_mini_at_strength_1_and_not_at_0():
    path = shipped_lora("pixel")
    assert path.stat().st_size < 1_000_000
    lora = read_lora(path)
    assert lora.format == "bfl" and lora.metadata["format"] == "flux-mini LoRA"
    models = load_models()
    updates = updates_for(lora, "flow", linear_shapes(models.flow))  # every entry fits a flux-mini Linear
    assert set(updates) == set(json.loads(lora.metadata["modules"]))
    settings = SampleSettings(steps=4)

    def image(strength):
        fused = fuse(models.flow, updates, strength)
        try:
            return np.asarray(generate(models, ["a smiling face"], [0], settings, progress=False)[0])
        finally:
            fused.undo()

    plain = np.asarray(generate(models, ["a smiling face"], [0], settings, progress=False)[0])
    assert np.array_equal(image(0.0), plain)
    changed = image(1.0)
    assert np.abs(changed.astype(int) - plain.astype(int)).mean() > 1.0
    assert np.array_equal(np.asarray(generate(models, ["a smiling face"], [0], settings, progress=False)[0]), plain)
