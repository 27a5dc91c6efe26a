"""Sampling math: schedule parity with diffusers, packing, noise, and the Euler loop on known fields."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flux_core import Flux, get_preset
from flux_core.sampling import (
    PIXELS_PER_TOKEN,
    ModelInputs,
    check_image_size,
    denoise,
    get_noise,
    get_schedule,
    img_ids,
    pack,
    prepare,
    txt_ids,
    unpack,
)

# ----------------------------------------------------------------------------- schedule


def flux_dev_scheduler():
    """diffusers' scheduler configured as in FLUX.1-dev's scheduler_config.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


@pytest.mark.parametrize("num_steps", [28, 50])
@pytest.mark.parametrize("height,width", [(512, 512), (1024, 1024), (768, 1360)])
def test_dev_schedule_matches_diffusers(height, width, num_steps):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    image_seq_len = (height // 16) * (width // 16)
    scheduler = flux_dev_scheduler()
    # Driven as FluxPipeline.__call__ drives it (step 5, "Prepare timesteps").
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    c = scheduler.config
    mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)

    ours = torch.tensor(get_schedule(num_steps, image_seq_len), dtype=torch.float64)
    ref = scheduler.sigmas.double()
    assert ours.shape == ref.shape == (num_steps + 1,)
    assert (ours - ref).abs().max().item() <= 1e-6
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_schnell_schedule_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    assert scheduler.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert get_schedule(4, 4096, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_schedule_shift_grows_with_resolution_and_validates_steps():
    small, large = get_schedule(10, 256), get_schedule(10, 4096)
    assert all(a <= b for a, b in zip(small, large, strict=True))  # more tokens: more time near noise
    assert small[5] < large[5]
    with pytest.raises(ValueError, match=r"num_steps must be an int >= 1; got 0"):
        get_schedule(0, 256)


# ----------------------------------------------------------------------------- sizes, noise, packing


@pytest.mark.parametrize(
    "height,width,message",
    [
        (1000, 1024, "height 1000 is not a multiple of 16; nearest valid: 992 or 1008"),
        (1024, 8, "width 8 is not a multiple of 16; nearest valid: 16"),
        (0, 1024, "height 0 is not a positive multiple of 16; nearest valid: 16"),
        (512, -32, "width -32 is not a positive multiple of 16; nearest valid: 16"),
    ],
)
def test_check_image_size_messages(height, width, message):
    with pytest.raises(ValueError) as info:
        check_image_size(height, width)
    assert str(info.value) == message


def test_check_image_size_accepts_multiples_of_16():
    check_image_size(16, 16)
    check_image_size(768, 1360)


def test_autoencoders_of_other_depths_set_the_token_size():
    # flux-mini's autoencoder has 3 levels (downsampling 4): one token covers 8x8 pixels.
    ppt = 2 * get_preset("flux-mini").ae_params.downsampling
    assert ppt == 8 and 2 * get_preset("flux-dev").ae_params.downsampling == PIXELS_PER_TOKEN == 16
    with pytest.raises(ValueError) as info:
        check_image_size(64, 60, pixels_per_token=ppt)
    assert str(info.value) == "width 60 is not a multiple of 8; nearest valid: 56 or 64"
    check_image_size(72, 40, pixels_per_token=ppt)
    noise = get_noise(1, 72, 40, seed=0, pixels_per_token=ppt)
    assert noise.shape == (1, 16, 18, 10)  # latents at 1/4 of the pixels
    inp = prepare(noise, torch.zeros(1, 3, 8), torch.zeros(1, 8))
    assert inp.img.shape == (1, 9 * 5, 64)
    assert torch.equal(inp.img_ids, img_ids(1, 72, 40, pixels_per_token=ppt))
    assert inp.img_ids[0, -1].tolist() == [0.0, 8.0, 4.0]  # last token: row 8, column 4
    assert torch.equal(unpack(inp.img, 72, 40, pixels_per_token=ppt), noise)


def test_get_noise_shape_dtype_and_determinism():
    a = get_noise(2, 1000, 600, seed=7)
    assert a.shape == (2, 16, 2 * math.ceil(1000 / 16), 2 * math.ceil(600 / 16))
    assert a.dtype == torch.bfloat16 and a.device.type == "cpu"
    assert torch.equal(a, get_noise(2, 1000, 600, seed=7))
    assert not torch.equal(a, get_noise(2, 1000, 600, seed=8))
    # The official recipe, spelled out: one CPU generator for the whole batch, drawn in bf16.
    official = torch.randn(2, 16, 126, 76, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, official)
    assert get_noise(1, 32, 32, seed=0, z_channels=4, dtype=torch.float32).shape == (1, 4, 4, 4)


def test_get_noise_seed_list_is_per_sample():
    batch = get_noise(3, 64, 48, seed=[5, 6, 7])
    for i, s in enumerate([5, 6, 7]):
        assert torch.equal(batch[i : i + 1], get_noise(1, 64, 48, seed=s))
    # Batch position does not change a sample.
    assert torch.equal(get_noise(2, 64, 48, seed=[9, 6])[1], batch[1])
    with pytest.raises(ValueError, match="got 2 seeds for num_samples=3"):
        get_noise(3, 64, 48, seed=[1, 2])


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 16),
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    trim_h=st.integers(0, 15),
    trim_w=st.integers(0, 15),
)
def test_pack_unpack_round_trip(b, c, rows, cols, trim_h, trim_w):
    height, width = 16 * rows - trim_h, 16 * cols - trim_w  # ceil(px / 16) gives back rows, cols
    x = torch.randn(b, c, 2 * rows, 2 * cols)
    packed = pack(x)
    assert packed.shape == (b, rows * cols, 4 * c)
    assert torch.equal(unpack(packed, height, width), x)
    assert torch.equal(pack(unpack(packed, height, width)), packed)


def test_pack_layout_and_ids_agree():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    packed, ids = pack(x), img_ids(2, 32, 48)
    for i in range(2):
        for j in range(3):
            token = i * 3 + j
            assert ids[1, token].tolist() == [0.0, i, j]
            for ch in range(3):
                for p in range(2):
                    for q in range(2):
                        assert packed[1, token, ch * 4 + p * 2 + q] == x[1, ch, 2 * i + p, 2 * j + q]


def test_pack_and_ids_match_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    x = torch.randn(2, 16, 6, 10)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)  # (N, 3)
    assert torch.equal(img_ids(2, 48, 80), ref_ids.expand(2, -1, -1))


def test_ids_values_and_dtype():
    ids = img_ids(1, 32, 48)
    assert ids.dtype == torch.float32 and ids.shape == (1, 6, 3)
    assert ids[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    t = txt_ids(2, 5)
    assert t.dtype == torch.float32 and t.shape == (2, 5, 3) and not t.any()


def test_pack_and_unpack_errors():
    with pytest.raises(ValueError, match=r"even h and w; got shape \(1, 16, 3, 4\)"):
        pack(torch.zeros(1, 16, 3, 4))
    with pytest.raises(ValueError, match=r"expects \(B, 4, C\*4\) tokens; got \(1, 5, 64\)"):
        unpack(torch.zeros(1, 5, 64), 32, 32)


def test_prepare_repeats_batch_one_text():
    latents = get_noise(2, 32, 48, seed=0)
    inp = prepare(latents, torch.randn(1, 7, 8), torch.randn(1, 5))
    assert isinstance(inp, ModelInputs)
    assert inp.img.shape == (2, 6, 64) and torch.equal(inp.img, pack(latents))
    assert torch.equal(inp.img_ids, img_ids(2, 32, 48))
    assert inp.txt.shape == (2, 7, 8) and torch.equal(inp.txt[0], inp.txt[1])
    assert torch.equal(inp.txt_ids, txt_ids(2, 7))
    assert inp.vec.shape == (2, 5)
    with pytest.raises(ValueError, match="batch sizes must be equal or 1"):
        prepare(get_noise(2, 32, 32, seed=0), torch.randn(3, 7, 8), torch.randn(1, 5))


# ----------------------------------------------------------------------------- the Euler loop


class StraightPaths(nn.Module):
    """The exact velocity field of straight paths into x0: v(x, t) = (x - x0) / t.

    From x_1 = eps its solution is x_t = (1 - t) x0 + t eps, where v = eps - x0 is constant, so
    Euler is exact and ends at x0. Records the times it is called at.
    """

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0)
        self.params = SimpleNamespace(guidance_embed=False)
        self.times: list[float] = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        assert guidance is None  # a model without guidance_in gets none
        self.times.append(timesteps[0].item())
        return (img - self.x0) / timesteps[:, None, None]


def straight_inputs(seed=0, b=2, n=6, c=8):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, n, c, generator=g), torch.randn(b, n, c, generator=g)
    return (
        x0,
        eps,
        dict(
            img_ids=img_ids(b, 32, 48), txt=torch.zeros(b, 3, 4), txt_ids=txt_ids(b, 3), vec=torch.zeros(b, 4)
        ),
    )


def test_euler_on_straight_paths_reaches_x0(capfd):
    x0, eps, cond = straight_inputs()
    model = StraightPaths(x0)
    timesteps = get_schedule(7, 6)
    calls = []

    def callback(step, t, t_next, img, pred):
        calls.append((step, t, t_next))
        # On the exact trajectory after every step, with the constant velocity.
        torch.testing.assert_close(img, (1 - t_next) * x0 + t_next * eps, atol=1e-5, rtol=0)
        torch.testing.assert_close(pred, eps - x0, atol=1e-5, rtol=0)

    out = denoise(model, eps, timesteps=timesteps, callback=callback, progress=False, **cond)
    assert out.dtype == torch.float32
    assert (out - x0).abs().max().item() < 1e-5
    assert [c[0] for c in calls] == list(range(7))
    ts = [c[1] for c in calls]
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False)) and ts[0] == 1.0 and calls[-1][2] == 0.0
    assert model.times == pytest.approx(timesteps[:-1])
    assert capfd.readouterr().err == ""


def test_progress_bar_writes_only_when_asked(capfd):
    x0, eps, cond = straight_inputs()
    denoise(StraightPaths(x0), eps, timesteps=[1.0, 0.5, 0.0], progress=True, **cond)
    assert "denoise" in capfd.readouterr().err
    denoise(StraightPaths(x0), eps, timesteps=[1.0, 0.5, 0.0], progress=False, **cond)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_parity_mode_rounds_in_latent_dtype():
    x0, eps, cond = straight_inputs()
    timesteps = get_schedule(20, 6)
    default = denoise(StraightPaths(x0), eps.bfloat16(), timesteps=timesteps, progress=False, **cond)
    parity = denoise(
        StraightPaths(x0), eps.bfloat16(), timesteps=timesteps, progress=False, parity=True, **cond
    )
    assert default.dtype == torch.float32 and parity.dtype == torch.bfloat16
    # The field ends every path at x0, whatever the (bf16) start.
    err_default = (default - x0).abs().max().item()
    err_parity = (parity.float() - x0).abs().max().item()
    print(f"straight paths, 20 steps: max error default {err_default:.2e}, parity {err_parity:.2e}")
    assert err_default < 1e-5  # float32 updates: exact up to float32 rounding
    assert 1e-4 < err_parity < 0.1  # bf16 updates: bf16 rounding at every step, nothing worse


# ----------------------------------------------------------------------------- true CFG


class TextConstant(nn.Module):
    """v = txt[b, 0, 0] + 10 * y[b, 0] everywhere: tells which prompt each batch row carried."""

    def __init__(self):
        super().__init__()
        self.params = SimpleNamespace(guidance_embed=False)
        self.batch_sizes: list[int] = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        self.batch_sizes.append(img.shape[0])
        assert img_ids.shape[0] == txt.shape[0] == txt_ids.shape[0] == y.shape[0] == img.shape[0]
        return torch.zeros_like(img) + (txt[:, 0, 0] + 10 * y[:, 0])[:, None, None]


def cfg_inputs():
    img = torch.randn(2, 4, 8)
    txt = torch.tensor([1.0, 2.0])[:, None, None].expand(2, 3, 4).clone()
    vec = torch.tensor([[0.1], [0.2]]).expand(2, 4).clone()
    return img, dict(img_ids=img_ids(2, 32, 32), txt=txt, txt_ids=txt_ids(2, 3), vec=vec)


def test_cfg_combination_in_one_batched_forward():
    img, cond = cfg_inputs()
    neg_txt, neg_vec = torch.full((1, 3, 4), -1.0), torch.full((1, 4), 0.5)  # batch 1: repeated
    model = TextConstant()
    out = denoise(
        model,
        img,
        timesteps=[1.0, 0.0],
        neg_txt=neg_txt,
        neg_vec=neg_vec,
        cfg_scale=3.0,
        progress=False,
        **cond,
    )
    v_pos = torch.tensor([1.0 + 1.0, 2.0 + 2.0])  # txt + 10 * vec
    v_neg = torch.tensor([-1.0 + 5.0, -1.0 + 5.0])
    v = v_neg + 3.0 * (v_pos - v_neg)
    torch.testing.assert_close(out, img - v[:, None, None], atol=1e-6, rtol=0)
    assert model.batch_sizes == [4]  # one forward per step, batch 2B


def test_cfg_scale_one_is_plain_sampling():
    img, cond = cfg_inputs()
    plain_model, cfg_model = TextConstant(), TextConstant()
    plain = denoise(plain_model, img, timesteps=[1.0, 0.4, 0.0], progress=False, **cond)
    same = denoise(
        cfg_model,
        img,
        timesteps=[1.0, 0.4, 0.0],
        neg_txt=torch.zeros(2, 3, 4),
        neg_vec=torch.zeros(2, 4),
        cfg_scale=1.0,
        progress=False,
        **cond,
    )
    assert torch.equal(plain, same)
    assert cfg_model.batch_sizes == [2, 2]


def test_cfg_errors():
    img, cond = cfg_inputs()
    with pytest.raises(ValueError) as info:
        denoise(
            TextConstant(),
            img,
            timesteps=[1.0, 0.0],
            neg_txt=torch.zeros(2, 5, 4),
            neg_vec=torch.zeros(2, 4),
            cfg_scale=2.0,
            progress=False,
            **cond,
        )
    assert str(info.value) == (
        "neg_txt has 5 tokens but txt has 3: true CFG runs both prompts in one batch, "
        "so they need the same length (pad both to the same T5 max_length)"
    )
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs neg_txt and neg_vec"):
        denoise(TextConstant(), img, timesteps=[1.0, 0.0], cfg_scale=2.0, progress=False, **cond)


# ----------------------------------------------------------------------------- the real (tiny) model


def tiny_model(seed: int, dtype=torch.float32) -> Flux:
    torch.manual_seed(seed)
    return Flux(get_preset("tiny").params).to(dtype).eval()


def tiny_inputs(seed: int, dtype=torch.float32) -> ModelInputs:
    p = get_preset("tiny").params
    g = torch.Generator().manual_seed(seed + 1)
    txt = torch.randn(1, 16, p.context_in_dim, generator=g)
    vec = torch.randn(1, p.vec_in_dim, generator=g)
    return prepare(get_noise(1, 32, 32, seed=seed, dtype=dtype), txt.to(dtype), vec.to(dtype))


def run_tiny(seed: int, **kwargs) -> torch.Tensor:
    inp = tiny_inputs(seed)
    timesteps = get_schedule(3, inp.img.shape[1])
    return denoise(
        tiny_model(seed),
        inp.img,
        inp.img_ids,
        inp.txt,
        inp.txt_ids,
        inp.vec,
        timesteps,
        guidance=3.5,
        progress=False,
        **kwargs,
    )


def test_tiny_model_denoise_is_finite_and_reproducible():
    out = run_tiny(0)
    assert out.shape == (1, 4, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert unpack(out, 32, 32).shape == (1, 16, 4, 4)
    assert torch.equal(out, run_tiny(0))
    assert not torch.equal(out, run_tiny(1))


def test_tiny_model_needs_guidance():
    inp = tiny_inputs(0)
    with pytest.raises(ValueError, match="guidance-distilled"):
        denoise(
            tiny_model(0), inp.img, inp.img_ids, inp.txt, inp.txt_ids, inp.vec, [1.0, 0.0], progress=False
        )


def test_tiny_cfg_equals_separate_forwards():
    inp = tiny_inputs(0)
    g = torch.Generator().manual_seed(5)
    neg_txt, neg_vec = torch.randn(inp.txt.shape, generator=g), torch.randn(inp.vec.shape, generator=g)
    model, ts = tiny_model(0), [1.0, 0.6]
    args = (model, inp.img, inp.img_ids)
    pos = denoise(*args, inp.txt, inp.txt_ids, inp.vec, ts, guidance=3.5, progress=False)
    neg = denoise(*args, neg_txt, inp.txt_ids, neg_vec, ts, guidance=3.5, progress=False)
    cfg = denoise(
        *args,
        inp.txt,
        inp.txt_ids,
        inp.vec,
        ts,
        guidance=3.5,
        neg_txt=neg_txt,
        neg_vec=neg_vec,
        cfg_scale=4.0,
        progress=False,
    )
    # One Euler step is affine in v, so the guided step is the same combination of the two steps.
    torch.testing.assert_close(cfg, neg + 4.0 * (pos - neg), atol=1e-5, rtol=1e-5)


def official_denoise(model, img, img_ids, txt, txt_ids, vec, timesteps, guidance):
    """The loop of BFL `flux/sampling.py` `denoise`, verbatim apart from names."""
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    with torch.inference_mode():
        for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:], strict=True):
            t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
            pred = model(
                img=img,
                img_ids=img_ids,
                txt=txt,
                txt_ids=txt_ids,
                y=vec,
                timesteps=t_vec,
                guidance=guidance_vec,
            )
            img = img + (t_prev - t_curr) * pred
    return img


def test_parity_mode_reproduces_official_bf16_loop():
    model, inp = tiny_model(0, torch.bfloat16), tiny_inputs(0, torch.bfloat16)
    fields = (inp.img, inp.img_ids, inp.txt, inp.txt_ids, inp.vec)
    timesteps = get_schedule(4, inp.img.shape[1])
    ours = denoise(model, *fields, timesteps, guidance=3.5, progress=False, parity=True)
    ref = official_denoise(model, *fields, timesteps, guidance=3.5)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref)
    # The default float32 update differs from it by bf16 rounding only.
    default = denoise(model, *fields, timesteps, guidance=3.5, progress=False)
    assert default.dtype == torch.float32 and not torch.equal(default, ours.float())
    rel = ((default - ours.float()).norm() / default.norm()).item()
    assert rel < 2e-2


@pytest.mark.parametrize("preset, real_image, cfg", [
    ("flux-dev", False, 1.0),  # guidance distilled into the model
    ("flux-schnell", False, 1.0),  # timestep-distilled: no guidance (its scale 0 would keep only the negative prompt)
    ("flux-mini", False, 6.0), ("flux-mini-kontext", False, 3.0),  # trained with caption dropout: true CFG
    ("flux-mini", True, 1.0),  # a real image is reconstructed without CFG
])  # fmt: skip
def test_default_true_cfg_scale_per_preset(preset, real_image, cfg):
    from flux_core import get_preset
    from fluxspace import SampleSettings

    assert SampleSettings().resolved(get_preset(preset), real_image=real_image).cfg_scale == cfg
    assert SampleSettings(cfg_scale=2.0).resolved(get_preset(preset), real_image=real_image).cfg_scale == 2.0
