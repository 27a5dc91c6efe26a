"""FLUX.2 end to end in the fluxspace pipeline and CLI, on the tiny-flux2 set `flux-weights random`
writes (transformer, FLUX.2 autoencoder, a tiny random Qwen3 in klein's text slot).

The pipeline adds nothing to the model-level sampler: a SamplingRun equals flux_core.flux2.sampling
.denoise called directly, bit for bit, with and without reference images. Zero edit strengths give
plain generate bit for bit. Bad input is refused in one line, with the messages below."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core.flux2 import sampling as f2
from flux_core.flux2.model import SIZES
from flux_core.presets import family_presets
from fluxspace import Concept, EditSpec, SampleSettings, edit_image, load_models
from fluxspace.cli import main
from fluxspace.images import read_png_params
from fluxspace.models import FLUX_MINI_DIR, ModelPaths, resolve_paths, resolve_preset
from fluxspace.run import SamplingRun, generate
from weights_tools.cli import main as weights_main

PROMPT = "a portrait of a woman with red hair and glasses"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-flux2")
    assert weights_main(["random", "--preset", "tiny-flux2", "--out", str(out), "--dtype", "float32"]) == 0
    return out


@pytest.fixture(scope="module")
def models(folder):
    return load_models(folder)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("refs") / "photo.png"
    Image.fromarray((torch.rand(72, 100, 3, generator=g) * 255).byte().numpy()).save(path)
    return path


def cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- loading


def test_load_models_resolves_the_flux2_set(models, folder):
    assert models.preset.name == "tiny-flux2" and models.family == "flux2"  # the preset our writer recorded
    assert models.paths == ModelPaths(folder / "flux2-tiny.safetensors", folder / "ae.safetensors", folder)
    assert models.text_length == 512 and models.pixels_per_token == 16
    assert type(models.flow).__name__ == "Flux2" and type(models.text).__name__ == "Flux2TextEncoder"


def test_klein_presets_are_read_from_sizes_and_diffusers_index(tmp_path):
    from fluxspace.flux2 import detect_preset

    class Files:  # what detect_preset reads: metadata and (through check_flux2_model) the shapes
        metadata = {}

    for name, base in (("flux-2-klein-4b.safetensors", False), ("flux-2-klein-base-4b.safetensors", True)):
        params = dataclasses.replace(SIZES["flux2-klein-4b"], guidance_embed=False)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("fluxspace.flux2.check_flux2_model", lambda files, preset=None, p=params: p)
            assert detect_preset(tmp_path / name, Files()).name == (
                "flux2-klein-base-4b" if base else "flux2-klein-4b"
            )
            (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline",
                                                                   "is_distilled": False}))  # fmt: skip
            assert detect_preset(tmp_path, Files()).name == "flux2-klein-base-4b"
            (tmp_path / "model_index.json").unlink()


def test_the_dev_text_path_end_to_end(tmp_path, capsys):
    """tiny-flux2-dev: [dev]'s Mistral3 text encoder (system message, layers 10/20/30) written by
    flux-weights random, loaded by the pipeline, its keyword masks found inside the chat."""
    from flux_core.flux2.conditioner import SPECS, load_text_encoder

    folder = tmp_path / "dev"
    assert weights_main(["random", "--preset", "tiny-flux2-dev", "--out", str(folder), "--dtype", "float32"]) == 0
    models = load_models(folder)
    assert models.preset.name == "tiny-flux2-dev" and models.params.guidance_embed
    assert type(models.text.model).__name__ == "MistralModel"  # Mistral3's language model (no vision tower)
    assert models.text.spec == SPECS["dev"] and models.text.spec.system_message is not None
    assert torch.equal(models.text([PROMPT]), load_text_encoder(folder, "dev", dtype=torch.float32)([PROMPT]))
    spec = EditSpec(concepts=(Concept("red hair", lambda_fine=4.0, tau_m=0.5),))
    r = edit_image(models, PROMPT, spec, seed=5, progress=False)
    assert r.original.tobytes() == generate(models, [PROMPT], [5], progress=False)[0].tobytes()
    assert r.edited.tobytes() != r.original.tobytes() and 0 < r.masks[0].mean() < 1
    assert main(["generate", PROMPT, "--model", str(folder), "--seed", "2", "--quiet", "--out", str(tmp_path / "g.png")]) == 0
    assert read_png_params(tmp_path / "g.png")["preset"] == "tiny-flux2-dev"
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("with_refs", [False, True])
def test_sampling_run_equals_flux2_denoise_bit_for_bit(models, photo, with_refs):
    run = SamplingRun.prepare(models, [PROMPT, PROMPT], [3, 4], image=[photo, photo] if with_refs else None,
                              progress=False)  # fmt: skip
    ours = run.sample(run.inp.img)
    ref = f2.denoise(models.flow, run.inp.img.float(), run.inp.img_ids, run.inp.txt, run.inp.txt_ids, run.timesteps,
                     run.settings.guidance, references=run.condition, progress=False)  # fmt: skip
    assert torch.equal(ours, ref)
    # The official recipe: bf16 noise per seed, the empirical-mu schedule, the preset's guidance.
    s = run.settings
    assert torch.equal(
        run.inp.img, f2.prepare(f2.get_noise(2, s.height, s.width, [3, 4]).float(), run.inp.txt).img
    )
    assert (
        run.timesteps == f2.get_schedule(4, run.inp.img.shape[1]) and s.guidance == 4.0 and s.cfg_scale == 1.0
    )
    if with_refs:  # two references at t = 10, 20; the size generated is the first one's, fitted to 16 px
        assert run.condition.ids[0, :, 0].unique().tolist() == [10, 20] and (s.width, s.height) == (96, 64)


def test_same_seed_same_image(models):
    one = generate(models, [PROMPT], [7], progress=False)[0]
    assert one.tobytes() == generate(models, [PROMPT], [7], progress=False)[0].tobytes() and one.size == (
        128,
        128,
    )
    assert one.tobytes() != generate(models, [PROMPT], [8], progress=False)[0].tobytes()
    # In a batch: the same noise (a generator per seed); the image may differ by float rounding of
    # batched CPU kernels, at most one level of 255 here.
    two = SamplingRun.prepare(models, ["a cat", PROMPT], [1, 7], progress=False)
    assert torch.equal(two.inp.img[1:], SamplingRun.prepare(models, [PROMPT], [7], progress=False).inp.img)
    pixels = [
        torch.tensor(list(im.get_flattened_data()))
        for im in (one, generate(models, ["a cat", PROMPT], [1, 7], progress=False)[1])
    ]
    assert (pixels[0] - pixels[1]).abs().max() <= 1


def test_true_cfg_combines_prompt_and_negative(models):
    """klein base's guidance: v_neg + s (v_pos - v_neg), the negative prompt "" by default."""
    s = SampleSettings(steps=2, cfg_scale=3.0)
    run = SamplingRun.prepare(models, [PROMPT], [1], s, progress=False)
    x, t = run.inp.img.float(), run.timesteps[0]
    got = run.velocity()(x, t, 0)
    plain = f2.Velocity(models.flow, run.inp.img_ids, run.inp.txt, run.inp.txt_ids, 4.0)
    neg = f2.Velocity(models.flow, run.inp.img_ids, models.text([""]), run.inp.txt_ids, 4.0)
    with torch.no_grad():
        v_pos, v_neg = plain(x, t), neg(x, t)
    torch.testing.assert_close(got, v_neg + 3.0 * (v_pos - v_neg), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- FluxSpace


def test_zero_strengths_give_plain_generate_bit_for_bit(models, photo):
    spec = EditSpec(concepts=(Concept("glasses", lambda_fine=0.0), Concept("red hair", lambda_fine=0.0)))
    for image in (None, [photo]):
        r = edit_image(models, PROMPT, spec, seed=5, image=image, progress=False)
        plain = generate(models, [PROMPT], [5], progress=False, image=image)[0]
        assert r.original.tobytes() == r.edited.tobytes() == plain.tobytes()


def test_fine_edit_with_keyword_masks_and_two_concepts(models, photo):
    spec = EditSpec(concepts=(Concept("glasses", lambda_fine=6.0, tau_m=0.5), Concept("red hair", -4.0, 0.0)))
    r = edit_image(models, PROMPT, spec, seed=5, image=[photo], progress=False)
    plain = generate(models, [PROMPT], [5], progress=False, image=[photo])[0]
    assert r.original.tobytes() == plain.tobytes() and r.edited.tobytes() != plain.tobytes()
    grid = (r.settings.height // 16, r.settings.width // 16)
    assert [m.shape for m in r.masks] == [grid, grid]
    assert 0 < r.masks[0].mean() < 1 and r.masks[1].min() == 1  # keyword mask; tau 0: every token


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_generate_edit_sweep(folder, photo, tmp_path, capsys):
    assert main(["generate", PROMPT, "--model", str(folder), "--seed", "2", "--out", str(tmp_path / "g.png"),
                 "--image", str(photo), "--image", str(photo), "--quiet"]) == 0  # fmt: skip
    params = read_png_params(tmp_path / "g.png")
    assert params["preset"] == "tiny-flux2" and params["image_path"] == [str(photo)] * 2
    assert (params["width"], params["height"], params["steps"], params["guidance"]) == (96, 64, 4, 4.0)
    assert {w["part"] for w in params["weights"]} == {"transformer", "ae", "text_encoder"}
    assert main(["edit", PROMPT, "--edit", "glasses:4", "--model", str(folder), "--seed", "2", "--quiet",
                 "--out-dir", str(tmp_path / "e")]) == 0  # fmt: skip
    assert read_png_params(tmp_path / "e" / "edited.png")["edit"]["concepts"][0]["prompt"] == "glasses"
    assert main(["sweep", PROMPT, "--edit", "glasses", "--vary", "lambda_fine=0,4", "--model", str(folder),
                 "--seed", "2", "--quiet", "--out", str(tmp_path / "s.png")]) == 0  # fmt: skip
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_file(models, tmp_path_factory):
    """A kohya LoRA (official names, alpha 2 at rank 4) on every Linear of the tiny FLUX.2's blocks."""
    from safetensors.torch import save_file

    from tests.lora_files import in_blocks, kohya_file, linear_names, random_pairs

    path = tmp_path_factory.mktemp("lora") / "klein-style.safetensors"
    save_file(kohya_file(random_pairs(linear_names(models.flow, in_blocks), 4, seed=3), "lora_unet_", 2.0), path)
    return path


def test_lora_through_the_pipeline_equals_fusing_it_by_hand(folder, models, lora_file, tmp_path):
    from flux_core.lora import fuse, linear_shapes, read_lora, updates_for

    plain = generate(models, [PROMPT], [5], progress=False)[0]
    with_lora = load_models(folder, loras=[f"{lora_file}:0.7"])
    assert with_lora.loras.summary()[0] | {"sha256": None} == {
        "file": "klein-style.safetensors", "sha256": None, "format": "kohya", "scale": 0.7}  # fmt: skip
    by_hand = load_models(folder)
    lora = read_lora(lora_file, family="flux2")
    fuse(by_hand.flow, updates_for(lora, "flow", linear_shapes(by_hand.flow)), 0.7)
    image = generate(with_lora, [PROMPT], [5], progress=False)[0]
    assert image.tobytes() == generate(by_hand, [PROMPT], [5], progress=False)[0].tobytes()
    assert image.tobytes() != plain.tobytes()
    unfused = load_models(folder, loras=[lora_file], lora_mode="unfused")
    unfused.loras.set_scale(0.0)  # strength 0: the plain model's image, bit for bit
    assert generate(unfused, [PROMPT], [5], progress=False)[0].tobytes() == plain.tobytes()
    unfused.loras.set_scale(0.7)
    assert generate(unfused, [PROMPT], [5], progress=False)[0].tobytes() != plain.tobytes()


def test_cli_lora_on_flux2(folder, lora_file, tmp_path, capsys):
    assert main(["edit", PROMPT, "--edit", "glasses:4", "--model", str(folder), "--seed", "2", "--quiet",
                 "--lora", f"{lora_file}:0.5", "--out-dir", str(tmp_path / "e")]) == 0  # fmt: skip
    (recorded,) = read_png_params(tmp_path / "e" / "edited.png")["loras"]
    assert (recorded["file"], recorded["format"], recorded["scale"]) == ("klein-style.safetensors", "kohya", 0.5)
    assert main(["sweep", PROMPT, "--edit", "glasses", "--vary", "lora_scale=0,1", "--model", str(folder), "--seed", "2", "--quiet",
                 "--lora", str(lora_file), "--out", str(tmp_path / "s.png")]) == 0  # fmt: skip
    params = read_png_params(tmp_path / "s.png")
    assert params["vary"] == {"lora_scale": [0.0, 1.0]} and params["loras"][0]["file"] == "klein-style.safetensors"
    grid = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    assert grid.shape[1] == 3 * 128 + 2 * 4  # the unedited image, then lora_scale 0 and 1, 128 px, 4 px apart
    at_0, at_1 = grid[:, 132:260], grid[:, 264:392]
    assert not np.array_equal(at_0, at_1)  # the LoRA's strength changes the image
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- refusals


def test_one_line_refusals(folder, photo, tmp_path, capsys):
    out = ["--out", tmp_path / "o.png"]
    code, err = cli(capsys, "edit", PROMPT, "--edit", "glasses", "--lambda-coarse", "1", "--model", folder,
                    "--out-dir", tmp_path / "e")  # fmt: skip
    assert (code, err) == (2, "fluxspace: error: FluxSpace's coarse edit (lambda_coarse) moves the pooled text "
                           "vector, and this model has none (FLUX.2 modulates by time and guidance only): set "
                           "lambda_coarse=0 and edit with the fine edit\n")  # fmt: skip
    lora = FLUX_MINI_DIR.parent / "loras" / "pixel.safetensors"  # flux-mini's LoRA: FLUX.1 module names
    code, err = cli(capsys, "generate", PROMPT, "--model", folder, "--lora", lora, *out)
    assert (code, err) == (2, f"fluxspace: error: {lora}: double_blocks.0.img_attn.proj.lora_A.weight takes 192 input "
                           "features; double_blocks.0.img_attn.proj of this model takes 64 (a LoRA for a model of "
                           "another width, or with extra input channels)\n")  # fmt: skip
    code, err = cli(capsys, "generate", PROMPT, "--model", folder, "--preset", "flux-dev", *out)
    assert (code, err) == (2, f"fluxspace: error: preset 'flux-dev' is a FLUX.1 model but {folder / 'flux2-tiny.safetensors'} "
                           f"is a FLUX.2 transformer; FLUX.2 presets: {', '.join(family_presets('flux2'))}\n")  # fmt: skip
    code, err = cli(capsys, "generate", PROMPT, "--preset", "flux2-klein-4b", *out)  # the default flux-mini
    assert code == 2 and err.startswith("fluxspace: error: preset 'flux2-klein-4b' is a FLUX.2 model but ")
    assert err.endswith(f"is a FLUX.1 transformer; FLUX.1 presets: {', '.join(family_presets('flux1'))}\n")
    code, err = cli(capsys, "invert", photo, "--model", folder, *out)
    assert (code, err) == (2, "fluxspace: error: inverting a real image runs on FLUX.1 models only; FLUX.2 takes an "
                           "image as a reference image (--image on generate, edit and sweep; image= in Python) instead\n")  # fmt: skip
    code, err = cli(
        capsys, "generate", PROMPT, "--image", photo, "--image", photo, "--model", "flux-mini-kontext", *out
    )
    assert (code, err) == (2, "fluxspace: error: flux-mini-kontext takes one --image; got 2 (several reference images "
                           "are for FLUX.2 models)\n")  # fmt: skip


def test_missing_parts_are_named(folder, tmp_path, capsys):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(folder / "flux2-tiny.safetensors", lone)
    shutil.copy(folder / "ae.safetensors", lone)
    with pytest.raises(FileNotFoundError) as e:
        resolve_paths(lone / "flux2-tiny.safetensors")
    assert str(e.value) == (
        f"FLUX.2 text encoder not found in {lone} (missing text_encoder/, tokenizer/); pass --text-encoders FOLDER "
        "laid out like the FLUX.2 repositories (text_encoder/ with the LLM: Mistral-Small-3.x for [dev], Qwen3 for "
        "[klein]; tokenizer/)"
    )
    paths = resolve_paths(lone / "flux2-tiny.safetensors", text_encoders=str(folder))  # --text-encoders
    assert resolve_preset(paths, None).name == "tiny-flux2"
    (lone / "ae.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"^FLUX.2 autoencoder not found at .*ae.safetensors \(nor a vae/"
    ):
        resolve_paths(lone / "flux2-tiny.safetensors", text_encoders=str(folder))
    with pytest.raises(ValueError, match=r"^the Qwen3 in .* gives 3 x 16 = 48 features a token, but the transformer "
                       r"takes 96: the text encoder belongs to another FLUX.2 model$"):  # fmt: skip
        from fluxspace.flux2 import check_text

        check_text(folder, resolve_preset(resolve_paths(folder), None), 96)


def test_offload_staged_and_block_streaming_give_the_same_image(folder, models):
    from fluxspace.runtime import Residency

    plain = generate(models, [PROMPT], [3], progress=False)[0].tobytes()
    for residency in (Residency(offload="model"), Residency(staged=True),
                      Residency(offload="blocks", cpu_streaming=True, block_group=1)):  # fmt: skip
        other = load_models(folder, residency=residency)
        assert generate(other, [PROMPT], [3], progress=False)[0].tobytes() == plain, residency
