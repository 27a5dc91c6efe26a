"""LoRAs on a loaded model (fluxspace/loras.py, load_models(loras=...), --lora): fused and unfused give
the same images, strength 0 is the plain model bit for bit, text-encoder entries reach CLIP and T5,
every offload mode and fp8 take them, FluxSpace edits / inversion / sweeps run with them, metadata
records them, and bad input is refused in one line before anything runs."""

import numpy as np
import pytest
import torch
from lora_files import in_blocks, kohya_file, linear_names, random_pairs
from PIL import Image
from safetensors.torch import save_file

from flux_core.lora import LoraLinear
from fluxspace import Concept, EditSpec, SampleSettings, edit_image, generate, load_models
from fluxspace.cli import main
from fluxspace.images import read_png_params
from fluxspace.inversion import invert_image
from fluxspace.loras import LoraSpec
from fluxspace.sweep import sweep

SETTINGS = SampleSettings(width=64, height=48, steps=2)
SPEC = EditSpec(concepts=(Concept("glasses", 4.0, 0.5),), lambda_coarse=0.3, coarse_prompt="glasses")


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def lora_file(tiny_checkpoint, tmp_path_factory):
    """A kohya LoRA for the tiny checkpoint: every block Linear, CLIP's first layer, T5's first block."""
    models = load_models(tiny_checkpoint.transformer)
    clip = models.text.clip.text_model if hasattr(models.text.clip, "text_model") else models.text.clip
    sd = kohya_file(random_pairs(linear_names(models.flow, in_blocks), 4, 0, std=1.0), "lora_unet_", 2.0)
    sd |= kohya_file(random_pairs(linear_names(clip, lambda n: "layers.0." in n), 2, 1, std=0.3), "lora_te1_text_model_", 2.0)
    sd |= kohya_file(random_pairs(linear_names(models.text.t5, lambda n: "block.0." in n), 2, 2, std=0.3), "lora_te3_", 2.0)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def plain(models):
    return generate(models, ["a red bicycle"], [3], SETTINGS, progress=False)[0]


def test_fused_and_unfused_give_the_same_image_and_strength_zero_is_plain(tiny_checkpoint, lora_file, plain):
    fused = load_models(tiny_checkpoint.transformer, loras=[f"{lora_file}:0.7"])
    a = generate(fused, ["a red bicycle"], [3], SETTINGS, progress=False)[0]
    assert np.abs(pixels(a) - pixels(plain)).mean() > 1, "the LoRA must change the image"
    unfused = load_models(tiny_checkpoint.transformer, loras=[LoraSpec(lora_file, 0.7)], lora_mode="unfused")
    assert any(isinstance(m, LoraLinear) for m in unfused.flow.modules())
    b = generate(unfused, ["a red bicycle"], [3], SETTINGS, progress=False)[0]
    assert np.abs(pixels(a) - pixels(b)).max() <= 1, "fused and unfused differ by float rounding at most"
    unfused.loras.set_scale(0.0)
    assert np.array_equal(pixels(generate(unfused, ["a red bicycle"], [3], SETTINGS, progress=False)[0]), pixels(plain))
    zero = load_models(tiny_checkpoint.transformer, loras=[f"{lora_file}:0"])
    assert np.array_equal(pixels(generate(zero, ["a red bicycle"], [3], SETTINGS, progress=False)[0]), pixels(plain))
    with pytest.raises(ValueError, match="LoRA strengths are fixed in fused mode"):
        fused.loras.set_scale(0.5)


def test_text_encoder_entries_are_the_formula(tiny_checkpoint, lora_file, models):
    """CLIP (lora_te1_, with the text_model. prefix files carry) and T5 (lora_te3_) weights move by s * alpha/r * B A."""
    lora = load_models(tiny_checkpoint.transformer, loras=[f"{lora_file}:0.5"])
    clip = lambda m: m.text.clip.text_model if hasattr(m.text.clip, "text_model") else m.text.clip  # noqa: E731
    from safetensors.torch import load_file

    sd = load_file(str(lora_file))
    for encoder, module, key in ((clip, "encoder.layers.0.self_attn.q_proj", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
                                 (lambda m: m.text.t5, "encoder.block.0.layer.0.SelfAttention.q", "lora_te3_encoder_block_0_layer_0_SelfAttention_q")):  # fmt: skip
        before = encoder(models).get_submodule(module).weight
        after = encoder(lora).get_submodule(module).weight
        expected = before + 0.5 * sd[f"{key}.alpha"] / 2 * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
        assert torch.allclose(after, expected, atol=1e-6)
    with torch.inference_mode():
        assert not torch.equal(models.text(["a cat"])[0], lora.text(["a cat"])[0])


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_every_offload_mode_and_fp8_take_loras(tiny_checkpoint, lora_file, mode):
    resident = load_models(tiny_checkpoint.transformer, loras=[lora_file], lora_mode=mode)
    want = edit_image(resident, "a smiling woman", SPEC, seed=5, settings=SETTINGS, progress=False)
    staged = load_models(tiny_checkpoint.transformer, loras=[lora_file], lora_mode=mode, offload="model", staged=True)
    for _ in range(2):  # the second run reloads the staged parts: the LoRA must be on them again
        got = edit_image(staged, "a smiling woman", SPEC, seed=5, settings=SETTINGS, progress=False)
        assert np.array_equal(pixels(want.edited), pixels(got.edited))
        assert np.array_equal(pixels(want.original), pixels(got.original))
    fp8 = load_models(tiny_checkpoint.transformer, loras=[lora_file], lora_mode=mode, weights="fp8")
    got = edit_image(fp8, "a smiling woman", SPEC, seed=5, settings=SETTINGS, progress=False)
    assert np.abs(pixels(want.edited) - pixels(got.edited)).mean() < 8, "fp8 is close to full, not exact"


def test_inversion_runs_with_a_lora(tiny_checkpoint, lora_file):
    models = load_models(tiny_checkpoint.transformer, loras=[lora_file])
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    r = invert_image(models, photo, "a photo", settings=SampleSettings(steps=2), edit_spec=SPEC, edit_prompt="a photo")
    assert r.edited is not None and np.isfinite(r.psnr)


def test_sweep_over_lora_strength(tiny_checkpoint, lora_file, models, tmp_path):
    want = edit_image(models, "a red bicycle", SPEC, seed=3, settings=SETTINGS, progress=False)
    lora = load_models(tiny_checkpoint.transformer, loras=[lora_file], lora_mode="unfused")
    grid, results = sweep(lora, "a red bicycle", SPEC, [("lora_scale", [0.0, 1.0])], seed=3, settings=SETTINGS)
    assert np.array_equal(pixels(results[0][0].edited), pixels(want.edited)), "strength 0 is the plain model"
    assert not np.array_equal(pixels(results[0][1].edited), pixels(want.edited))
    assert lora.loras.scales["lora0"] == 1.0, "the sweep leaves the strengths as they were"
    out = tmp_path / "grid.png"
    small = ["--model", str(tiny_checkpoint.transformer), "--width", "64", "--height", "48", "--steps", "2", "--quiet"]
    assert main(["sweep", "a red bicycle", "--edit", "glasses", "--vary", "lora_scale=0,0.5,1", "--lora", str(lora_file),
                 "--out", str(out), *small]) == 0  # fmt: skip
    params = read_png_params(out)
    assert params["vary"] == {"lora_scale": [0.0, 0.5, 1.0]} and params["lora_mode"] == "unfused"


def test_metadata_records_each_lora(tiny_checkpoint, lora_file, tmp_path):
    import hashlib

    out = tmp_path / "a.png"
    small = ["--model", str(tiny_checkpoint.transformer), "--width", "64", "--height", "48", "--steps", "2", "--quiet"]
    assert main(["generate", "a cat", "--lora", f"{lora_file}:0.25", "--lora", str(lora_file), "--out", str(out), *small]) == 0
    loras = read_png_params(out)["loras"]
    sha = hashlib.sha256(lora_file.read_bytes()).hexdigest()
    assert loras == [{"file": "style.safetensors", "sha256": sha, "format": "kohya", "scale": 0.25},
                     {"file": "style.safetensors", "sha256": sha, "format": "kohya", "scale": 1.0}]  # fmt: skip


def test_bad_loras_are_refused_in_one_line_before_any_work(tiny_checkpoint, lora_file, tmp_path, capsys):
    far = tmp_path / "far.safetensors"
    save_file(kohya_file({"double_blocks.9.img_attn.qkv": (torch.zeros(4, 32), torch.zeros(96, 4))}, "lora_unet_", 1.0), str(far))
    cases = [
        (["--lora", str(tmp_path / "none.safetensors")], "--lora " + str(tmp_path / "none.safetensors") + ": no such file"),
        (["--lora", f"{lora_file}:abc"], f"--lora LoRA '{lora_file}:abc': 'abc' is not a strength; write FILE or FILE:SCALE"),
        (["--lora", f"{lora_file}:nan"], f"--lora LoRA strength nan for {lora_file} must be a finite number"),
        (["--lora", f"{lora_file}:inf"], f"--lora LoRA strength inf for {lora_file} must be a finite number"),
        (["--lora", str(far)], f"{far}: lora_unet_double_blocks_9_img_attn_qkv updates double_blocks.9.img_attn.qkv, "
                               "which this model does not have"),
        (["--lora", str(tiny_checkpoint.transformer)], f"{tiny_checkpoint.transformer}: not a LoRA file"),
    ]
    for flags, message in cases:
        out = tmp_path / "x.png"
        with pytest.raises(SystemExit) as e:
            main(["generate", "a cat", "--model", str(tiny_checkpoint.transformer), "--out", str(out), *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"fluxspace: error: {message}") and err.count("\n") == 1, err
        assert not out.exists()
    with pytest.raises(SystemExit):
        main(["sweep", "a cat", "--edit", "glasses", "--vary", "lora_scale=0,1", "--model", str(tiny_checkpoint.transformer),
              "--out", str(tmp_path / "g.png")])  # fmt: skip
    assert capsys.readouterr().err == "fluxspace: error: --vary lora_scale needs a LoRA: add --lora FILE\n"
