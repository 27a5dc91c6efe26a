"""FLUX.1 Kontext in flux_core: conditioning tokens after the image's, ids on axis 0 = 1, their
prediction dropped; against the official loop (bf16 parity: the same bits) and against diffusers'
FluxKontextPipeline transformer call (float32, <= 1e-5); the preferred-resolution fit."""

import pytest
import torch
from test_model import random_state_dict, rel_err

from flux_core import Flux, get_preset
from flux_core.formats import bfl_to_diffusers_transformer
from flux_core.sampling import (
    Condition,
    Velocity,
    denoise,
    get_noise,
    get_schedule,
    img_ids,
    preferred_size,
    prepare,
    prepare_condition,
)
from weights_tools.diffusers_reference import diffusers_transformer

# The official list (flux/util.py PREFERED_KONTEXT_RESOLUTIONS), as (width, height).
OFFICIAL = [(672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
            (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
            (1568, 672)]  # fmt: skip


def tiny(dtype=torch.float32) -> Flux:
    with torch.device("meta"):
        model = Flux(get_preset("tiny").params)
    model.load_state_dict(random_state_dict(model, 0), strict=True, assign=True)
    return model.to(dtype).eval()


def inputs(dtype, h=32, w=48, ch=24, cw=16):
    """Text-to-image inputs for an h x w latent and a conditioning latent of ch x cw (another size)."""
    p = get_preset("tiny").params
    g = torch.Generator().manual_seed(1)
    txt, vec = torch.randn(1, 7, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g)
    inp = prepare(get_noise(1, 8 * h, 8 * w, seed=3, dtype=dtype), txt.to(dtype), vec.to(dtype))
    cond = prepare_condition(torch.randn(1, 16, ch, cw, generator=g).to(dtype))
    return inp, cond


def official_kontext_denoise(model, img, img_ids, txt, txt_ids, vec, timesteps, guidance, img_cond_seq, img_cond_seq_ids):
    """The loop of BFL `flux/sampling.py` `denoise` with sequence conditioning, verbatim apart from names."""
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    with torch.inference_mode():
        for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:], strict=True):
            t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
            img_input = torch.cat((img, img_cond_seq), dim=1)
            img_input_ids = torch.cat((img_ids, img_cond_seq_ids), dim=1)
            pred = model(img=img_input, img_ids=img_input_ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t_vec,
                         guidance=guidance_vec)  # fmt: skip
            pred = pred[:, : img.shape[1]]
            img = img + (t_prev - t_curr) * pred
    return img


def test_condition_ids_are_the_grid_with_axis_0_set_to_1():
    cond = prepare_condition(torch.zeros(1, 16, 6, 4), batch=2)
    assert cond.img.shape == (2, 6, 64) and cond.ids.shape == (2, 6, 3)
    expected = img_ids(2, 6, 4, pixels_per_token=2).clone()
    expected[..., 0] = 1
    assert torch.equal(cond.ids, expected)


def test_kontext_denoise_is_the_official_loop_bit_for_bit_in_parity_mode():
    model = tiny(torch.bfloat16)
    inp, cond = inputs(torch.bfloat16)
    ts = get_schedule(3, inp.img.shape[1])  # the schedule of the generated tokens only (official cli_kontext)
    fields = (inp.img, inp.img_ids, inp.txt, inp.txt_ids, inp.vec)
    ours = denoise(model, *fields, ts, guidance=2.5, progress=False, parity=True, condition=cond)
    ref = official_kontext_denoise(model, *fields, ts, 2.5, cond.img, cond.ids)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref)
    plain = denoise(model, *fields, ts, guidance=2.5, progress=False, parity=True)
    assert not torch.equal(plain, ours), "the conditioning image must reach the prediction"


def test_kontext_velocity_matches_diffusers_kontext_transformer_call():
    from diffusers import FluxKontextPipeline

    model = tiny()
    ref = diffusers_transformer(model.params)
    ref.load_state_dict(bfl_to_diffusers_transformer(model.state_dict()), strict=True, assign=True)
    ref.eval()
    p = model.params
    g = torch.Generator().manual_seed(5)
    h, w, ch, cw = 8, 12, 6, 10  # latent sizes (2x the token grid)
    latents, image = torch.randn(1, 16, h, w, generator=g), torch.randn(1, 16, ch, cw, generator=g)
    txt, vec = torch.randn(1, 7, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g)
    t = 0.7
    # diffusers: FluxKontextPipeline.prepare_latents and the denoising loop's transformer call
    packed = FluxKontextPipeline._pack_latents(latents, 1, 16, h, w)
    image_latents = FluxKontextPipeline._pack_latents(image, 1, 16, ch, cw)
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(1, ch // 2, cw // 2, "cpu", torch.float32)
    image_ids[..., 0] = 1
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    with torch.inference_mode():
        expected = ref(hidden_states=torch.cat([packed, image_latents], dim=1), timestep=torch.tensor([t]),
                       guidance=torch.tensor([2.5]), pooled_projections=vec, encoder_hidden_states=txt,
                       txt_ids=torch.zeros(7, 3), img_ids=torch.cat([latent_ids, image_ids], dim=0),
                       return_dict=False)[0][:, : packed.shape[1]]  # fmt: skip
    inp = prepare(latents, txt, vec)
    v = Velocity(model, inp.img_ids, inp.txt, inp.txt_ids, inp.vec, 2.5, condition=prepare_condition(image))
    ours = v(inp.img, t)
    assert torch.equal(inp.img, packed)
    assert ours.shape == packed.shape and rel_err(ours, expected) <= 1e-5
    plain = Velocity(model, inp.img_ids, inp.txt, inp.txt_ids, inp.vec, 2.5)(inp.img, t)
    assert rel_err(plain, expected) > 1e-3


def test_true_cfg_carries_the_condition_in_both_halves():
    model = tiny()
    inp, cond = inputs(torch.float32)
    neg_txt, neg_vec = torch.zeros_like(inp.txt), torch.zeros_like(inp.vec)
    pos = Velocity(model, inp.img_ids, inp.txt, inp.txt_ids, inp.vec, 2.5, condition=cond)(inp.img, 0.5)
    neg = Velocity(model, inp.img_ids, neg_txt, inp.txt_ids, neg_vec, 2.5, condition=cond)(inp.img, 0.5)
    cfg = Velocity(model, inp.img_ids, inp.txt, inp.txt_ids, inp.vec, 2.5, neg_txt=neg_txt, neg_vec=neg_vec,
                   cfg_scale=3.0, condition=cond)(inp.img, 0.5)  # fmt: skip
    torch.testing.assert_close(cfg, neg + 3.0 * (pos - neg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size, fitted", [((1000, 1000), (1024, 1024)), ((1920, 1080), (1392, 752)),
                                          ((600, 800), (880, 1184)), ((64, 64), (1024, 1024))])  # fmt: skip
def test_preferred_size_is_the_official_choice(size, fitted):
    """The official rule: min over (|aspect - w/h|, w, h), so ties go to the smaller width."""
    assert preferred_size(*size, OFFICIAL) == fitted
    w, h = size
    official = min((abs(w / h - rw / rh), rw, rh) for rw, rh in OFFICIAL)[1:]
    assert fitted == official


def test_bad_conditions_are_refused():
    with pytest.raises(ValueError, match=r"a conditioning latent is \(B, C, h, w\)"):
        prepare_condition(torch.zeros(16, 4, 4))
    model = tiny()
    inp, cond = inputs(torch.float32)
    with pytest.raises(ValueError, match="must have the batch size 1"):
        Velocity(model, inp.img_ids, inp.txt, inp.txt_ids, inp.vec, 2.5, condition=Condition(cond.img.repeat(2, 1, 1), cond.ids))


# ----------------------------------------------------------------------------------------------
# FluxSpace on Kontext (fluxspace/step.py: n_generated)


def encoded(model, seed=2):
    """A prior and one concept as random T5 embeddings of inputs()'s 7 tokens, and a coarse vector."""
    from fluxspace.spec import EncodedEdit

    g = torch.Generator().manual_seed(seed)
    p = model.params
    return EncodedEdit(torch.randn(2, 7, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g), [[1, 2]])


def kontext_step(model, spec, n_generated, seed=2):
    """One forward on (generated + conditioning) image tokens with a FluxSpace edit; per double
    block (the edit's image attention output, the plain one)."""
    from edit_probe import Spy

    from fluxspace.step import FluxSpaceEdit

    inp, cond = inputs(torch.float32, h=8, w=8, ch=8, cw=4)
    assert inp.img.shape[1] == n_generated
    enc = encoded(model, seed=seed)
    spy = Spy(FluxSpaceEdit(spec, enc, n_generated=n_generated))
    with torch.inference_mode():
        model(img=torch.cat([inp.img, cond.img], 1), img_ids=torch.cat([inp.img_ids, cond.ids], 1), txt=inp.txt,
              txt_ids=inp.txt_ids, y=inp.vec, timesteps=torch.tensor([0.6]), guidance=torch.tensor([2.5]), edit=spy)  # fmt: skip
    return spy.outputs


def test_fluxspace_on_kontext_leaves_the_conditioning_tokens_as_the_plain_model_does():
    from fluxspace.spec import Concept, EditSpec

    model = tiny()
    n = 16  # an 8 x 8 latent: 16 generated tokens, then 8 conditioning tokens
    spec = EditSpec(concepts=(Concept("x", 4.0, tau_m=0.0),))
    for a_hat, a_plain in kontext_step(model, spec, n).values():
        assert a_hat.shape[1] == n + 8
        assert (a_hat[:, :n] - a_plain[:, :n]).abs().max() > 1e-3, "the generated tokens are edited"
        # no edit on them: the plain attention, up to the rounding of the shared-key merge (attention.py)
        torch.testing.assert_close(a_hat[:, n:], a_plain[:, n:], rtol=1e-5, atol=1e-6)
    both = EditSpec(concepts=(Concept("x", 4.0, tau_m=0.0),), edit_condition=True)
    for a_hat, a_plain in kontext_step(model, both, n).values():
        assert (a_hat[:, n:] - a_plain[:, n:]).abs().max() > 1e-3, "--edit-condition edits them too"


def test_fluxspace_on_kontext_with_zero_scales_is_plain_kontext_bit_for_bit():
    from fluxspace.spec import Concept, EditSpec
    from fluxspace.step import FluxSpaceSchedule

    model = tiny()
    inp, cond = inputs(torch.float32)
    ts = get_schedule(3, inp.img.shape[1])
    fields = (inp.img, inp.img_ids, inp.txt, inp.txt_ids, inp.vec)
    enc = encoded(model)
    plain = denoise(model, *fields, ts, guidance=2.5, progress=False, condition=cond)
    zero = FluxSpaceSchedule(EditSpec(concepts=(Concept("x", 0.0),)), enc, n_generated=inp.img.shape[1])
    assert torch.equal(plain, denoise(model, *fields, ts, guidance=2.5, progress=False, condition=cond, edit=zero))
    on = FluxSpaceSchedule(EditSpec(concepts=(Concept("x", 3.0, tau_m=0.5),)), enc, n_generated=inp.img.shape[1])
    edited = denoise(model, *fields, ts, guidance=2.5, progress=False, condition=cond, edit=on)
    assert not torch.allclose(plain, edited)
    (mask,) = on.masks.mean()
    assert mask.shape == (1, inp.img.shape[1]), "masks cover the generated image's grid"


# ----------------------------------------------------------------------------------------------
# Kontext runs: generate / edit / sweep with the image to edit, CLI and refusals (tiny-kontext preset)


@pytest.fixture(scope="module")
def kontext(tiny_checkpoint):
    from fluxspace import load_models

    return load_models(tiny_checkpoint.transformer, preset="tiny-kontext")


@pytest.fixture(scope="module")
def photo():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8))


def test_kontext_generate_fits_the_image_and_conditions_on_it(kontext, photo):
    import numpy as np

    from fluxspace import SampleSettings, generate

    s = SampleSettings(steps=2)
    a = generate(kontext, ["add a hat"], [1], s, progress=False, image=photo)[0]
    assert a.size == (160, 96), "the closest training resolution in aspect ratio (150 x 90 -> 160 x 96)"
    other = photo.transpose(0)  # the same pixels mirrored: another conditioning image
    b = generate(kontext, ["add a hat"], [1], s, progress=False, image=other)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    c = generate(kontext, ["add a hat"], [1], SampleSettings(steps=2, width=128, height=128), progress=False, image=photo)[0]
    assert c.size == (128, 128), "settings choose the generated size"


def test_fluxspace_edit_on_kontext_needs_no_inversion(kontext, photo):
    import numpy as np

    from fluxspace import Concept, EditSpec, SampleSettings, edit_image

    spec = EditSpec(concepts=(Concept("glasses", 4.0, 0.5),))
    r = edit_image(kontext, "add glasses", spec, seed=1, settings=SampleSettings(steps=2), progress=False, image=photo)
    assert r.original.size == r.edited.size == (160, 96) and r.masks[0].shape == (96 // 16, 160 // 16)
    assert not np.array_equal(np.asarray(r.original), np.asarray(r.edited))
    zero = EditSpec(concepts=(Concept("glasses", 0.0),))
    z = edit_image(kontext, "add glasses", zero, seed=1, settings=SampleSettings(steps=2), progress=False, image=photo)
    assert np.array_equal(np.asarray(z.original), np.asarray(z.edited)) and np.array_equal(
        np.asarray(z.original), np.asarray(r.original))  # fmt: skip
    from fluxspace.inversion import InversionSettings

    with pytest.raises(ValueError) as e:  # inversion settings have nothing to set on a conditioning model
        edit_image(kontext, "add glasses", spec, seed=1, progress=False, image=photo, inversion=InversionSettings())
    assert str(e.value) == ("tiny-kontext edits an image by instruction (the image conditions the run), without "
                            "inversion: inversion settings do not apply")  # fmt: skip


def test_kontext_refusals(kontext, models, photo):
    from fluxspace import SampleSettings, generate

    with pytest.raises(ValueError, match="tiny-kontext is a Kontext model: it edits an image by instruction; give the image"):
        generate(kontext, ["add a hat"], [1], SampleSettings(steps=2), progress=False)
    with pytest.raises(ValueError, match="tiny draws from text only and takes no image to condition on"):
        generate(models, ["a cat"], [1], SampleSettings(steps=2), progress=False, image=photo)


def test_kontext_cli(tiny_checkpoint, tmp_path, capsys, photo):
    from fluxspace.cli import main
    from fluxspace.images import read_png_params

    photo.save(tmp_path / "photo.png")
    base = ["--model", str(tiny_checkpoint.transformer), "--preset", "tiny-kontext", "--steps", "2", "--quiet"]
    out = tmp_path / "k.png"
    assert main(["generate", "add a hat", "--image", str(tmp_path / "photo.png"), "--out", str(out), *base]) == 0
    params = read_png_params(out)
    assert (params["preset"], params["width"], params["height"]) == ("tiny-kontext", 160, 96)
    assert params["image_path"] == str(tmp_path / "photo.png")
    edit = tmp_path / "edit"
    assert main(["edit", "--instruction", "add glasses", "--edit", "glasses:3", "--image", str(tmp_path / "photo.png"),
                 "--out-dir", str(edit), *base]) == 0  # fmt: skip
    assert read_png_params(edit / "edited.png")["instruction"] == "add glasses"
    assert main(["sweep", "add glasses", "--edit", "glasses", "--vary", "lambda_fine=0,3", "--image",
                 str(tmp_path / "photo.png"), "--out", str(tmp_path / "s.png"), *base]) == 0  # fmt: skip
    capsys.readouterr()
    cases = [
        (["generate", "add a hat", "--out", str(tmp_path / "x.png"), *base],
         "tiny-kontext is a Kontext model: it edits an image by instruction; give --image FILE"),
        (["generate", "a cat", "--image", str(tmp_path / "photo.png"), "--out", str(tmp_path / "x.png"),
          "--model", str(tiny_checkpoint.transformer)], "tiny draws from text only and takes no --image"),
        (["generate", "add a hat", "--image", str(tmp_path / "none.png"), "--out", str(tmp_path / "x.png"), *base],
         "cannot read image"),
        (["edit", "add glasses", "--instruction", "add glasses", "--image", str(tmp_path / "photo.png"), *base],
         "give the base prompt (or, for a Kontext model, --instruction), once"),
        (["generate", "add a hat", "--image", str(tmp_path / "photo.png"), "--width", "100", "--out",
          str(tmp_path / "x.png"), *base], "width"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("pipeline, preset", [("FluxKontextPipeline", "flux-kontext-dev"), ("FluxPipeline", "flux-dev"),
                                              (None, "flux-dev")])  # fmt: skip
def test_a_diffusers_kontext_folder_is_kontext_by_its_model_index(tiny_checkpoint, tmp_path, pipeline, preset):
    import json

    from safetensors.torch import load_file, save_file

    from flux_core.files import read_header
    from fluxspace.models import ModelPaths, resolve_preset

    # dev-shaped keys without a recorded preset, as the official diffusers folders hold them (the
    # tiny model's RoPE axes stay recorded: only the official head size's can be inferred)
    sd = bfl_to_diffusers_transformer(load_file(tiny_checkpoint.transformer))
    meta = {k: v for k, v in read_header(tiny_checkpoint.transformer)[2].items() if k != "fluxspace.preset"}
    (tmp_path / "transformer").mkdir()
    save_file(sd, tmp_path / "transformer" / "diffusion_pytorch_model.safetensors", metadata=meta)
    if pipeline is not None:
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    assert resolve_preset(ModelPaths(tmp_path, tmp_path, tmp_path), None).name == preset
    assert resolve_preset(ModelPaths(tmp_path, tmp_path, tmp_path), "flux-dev").name == "flux-dev"  # --preset wins


def test_shipped_models_by_name():
    from fluxspace.models import FLUX_MINI_DIR, resolve_paths, shipped_paths

    mini = resolve_paths("flux-mini")
    assert (mini.transformer, mini.ae, mini.text_encoders) == (
        FLUX_MINI_DIR / "flux-mini.safetensors", FLUX_MINI_DIR / "ae.safetensors", FLUX_MINI_DIR)  # fmt: skip
    kontext = FLUX_MINI_DIR.parent / "flux-mini-kontext" / "flux-mini-kontext.safetensors"
    assert resolve_paths("flux-mini-kontext").transformer == kontext == shipped_paths("flux-mini-kontext").transformer
    assert resolve_paths("flux-mini-kontext").ae == FLUX_MINI_DIR / "ae.safetensors"
    with pytest.raises(FileNotFoundError, match="a shipped model's name: flux-mini, flux-mini-kontext"):
        resolve_paths("flux-maxi")
