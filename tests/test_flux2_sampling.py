"""FLUX.2 sampling against the official code (black-forest-labs/flux2 src/flux2/sampling.py and
scripts/cli.py), transcribed below verbatim apart from names: noise, schedule, ids, reference-image
ids, unpack (scatter_ids) and the denoise loop with a stand-in model (bit for bit)."""

import math

import pytest
import torch
from einops import rearrange
from torch import nn

from flux_core.flux2.sampling import (
    compute_empirical_mu,
    denoise,
    get_noise,
    get_schedule,
    prepare,
    prepare_references,
    reference_size,
    unpack,
)

# ----------------------------------------------------------------------------- the official code


def official_noise(height, width, seed, device="cpu"):
    """scripts/cli.py (generator on `device`; the official run uses cuda)."""
    shape = (1, 128, height // 16, width // 16)
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16, device=device)


def official_mu(image_seq_len: int, num_steps: int) -> float:
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        mu = a2 * image_seq_len + b2
        return float(mu)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    mu = a * num_steps + b
    return float(mu)


def official_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    mu = official_mu(image_seq_len, num_steps)
    timesteps = torch.linspace(1, 0, num_steps + 1)
    timesteps = math.exp(mu) / (math.exp(mu) + (1 / timesteps - 1) ** 1.0)  # generalized_time_snr_shift
    return timesteps.tolist()


def prc_txt(x, t_coord=None):
    _l, _ = x.shape
    coords = {"t": torch.arange(1) if t_coord is None else t_coord, "h": torch.arange(1), "w": torch.arange(1),
              "l": torch.arange(_l)}  # fmt: skip
    x_ids = torch.cartesian_prod(coords["t"], coords["h"], coords["w"], coords["l"])
    return x, x_ids.to(x.device)


def prc_img(x, t_coord=None):
    _, h, w = x.shape
    x_coords = {"t": torch.arange(1) if t_coord is None else t_coord, "h": torch.arange(h), "w": torch.arange(w),
                "l": torch.arange(1)}  # fmt: skip
    x_ids = torch.cartesian_prod(x_coords["t"], x_coords["h"], x_coords["w"], x_coords["l"])
    x = rearrange(x, "c h w -> (h w) c")
    return x, x_ids.to(x.device)


def batched(fn):
    def batched_prc(x, t_coord=None):
        results = [fn(x[i], t_coord[i] if t_coord is not None else None) for i in range(len(x))]
        x, x_ids = zip(*results, strict=True)
        return torch.stack(x), torch.stack(x_ids)

    return batched_prc


def official_refs(encoded_refs):
    """encode_image_refs after `ae.encode` (encoded_refs: list of (C, h, w))."""
    scale = 10
    t_off = [scale + scale * t for t in torch.arange(0, len(encoded_refs))]
    t_off = [t.view(-1) for t in t_off]
    ref_tokens, ref_ids = zip(*[prc_img(x, t) for x, t in zip(encoded_refs, t_off, strict=True)], strict=True)
    ref_tokens = torch.cat(ref_tokens, dim=0).unsqueeze(0)
    ref_ids = torch.cat(ref_ids, dim=0).unsqueeze(0)
    return ref_tokens.to(torch.bfloat16), ref_ids


def compress_time(t_ids):
    t_ids_max = torch.max(t_ids)
    t_remap = torch.zeros((t_ids_max + 1,), device=t_ids.device, dtype=t_ids.dtype)
    t_unique_sorted_ids = torch.unique(t_ids, sorted=True)
    t_remap[t_unique_sorted_ids] = torch.arange(
        len(t_unique_sorted_ids), device=t_ids.device, dtype=t_ids.dtype
    )
    return t_remap[t_ids]


def scatter_ids(x, x_ids):
    x_list = []
    for data, pos in zip(x, x_ids, strict=True):
        _, ch = data.shape
        t_ids, h_ids, w_ids = (pos[:, i].to(torch.int64) for i in range(3))
        t_ids_cmpr = compress_time(t_ids)
        t, h, w = torch.max(t_ids_cmpr) + 1, torch.max(h_ids) + 1, torch.max(w_ids) + 1
        flat_ids = t_ids_cmpr * w * h + h_ids * w + w_ids
        out = torch.zeros((t * h * w, ch), device=data.device, dtype=data.dtype)
        out.scatter_(0, flat_ids.unsqueeze(1).expand(-1, ch), data)
        x_list.append(rearrange(out, "(t h w) c -> 1 c t h w", t=t, h=h, w=w))
    return x_list


def official_denoise(
    model, img, img_ids, txt, txt_ids, timesteps, guidance, img_cond_seq=None, img_cond_seq_ids=None
):
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:], strict=True):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        img_input = img
        img_input_ids = img_ids
        if img_cond_seq is not None:
            img_input = torch.cat((img_input, img_cond_seq), dim=1)
            img_input_ids = torch.cat((img_input_ids, img_cond_seq_ids), dim=1)
        pred = model(img_input, img_input_ids, t_vec, txt, txt_ids, guidance_vec)
        if img_input_ids is not None:
            pred = pred[:, : img.shape[1]]
        img = img + (t_prev - t_curr) * pred
    return img


def official_reference_size(w, h, n):
    """default_prep on sizes: cap_pixels then center_crop_to_multiple_of_x(16)."""
    k = 1024**2 if n > 1 else 2024**2
    if w * h > k:
        scale = math.sqrt(k / (w * h))
        w, h = int(w * scale), int(h * scale)
    return (w // 16) * 16, (h // 16) * 16


# ----------------------------------------------------------------------------- a stand-in model


class StandIn(nn.Module):
    """Mixes every input the FLUX.2 transformer takes, so a wrong id, time, guidance or token order shows."""

    def __init__(self, channels: int, txt_dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_img = nn.Parameter(torch.randn(channels, channels, generator=g) / channels**0.5)
        self.w_txt = nn.Parameter(torch.randn(txt_dim, channels, generator=g) / txt_dim**0.5)
        self.w_ids = nn.Parameter(torch.randn(4, channels, generator=g) * 0.1)
        self.calls = []

    def forward(self, img, img_ids, timesteps, txt, txt_ids, guidance):
        self.calls.append(
            (img.shape, img_ids.clone(), timesteps.clone(), None if guidance is None else guidance.clone())
        )
        txt_mix = (txt @ self.w_txt.to(txt.dtype) * (1 + txt_ids[..., 3:].to(txt.dtype))).mean(
            1, keepdim=True
        )
        pos = img_ids.to(img.dtype) @ self.w_ids.to(img.dtype)  # (B, L, C)
        g = 0 if guidance is None else guidance[:, None, None]
        out = torch.tanh(img @ self.w_img.to(img.dtype) + txt_mix + pos) * timesteps[:, None, None] + 0.01 * g
        return out.to(img.dtype)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("height, width, seed", [(256, 256, 0), (512, 768, 42), (1024, 1360 // 16 * 16, 7)])
def test_noise_equals_official_for_a_seed(height, width, seed):
    ours = get_noise(1, height, width, seed)
    ref = official_noise(height, width, seed)
    assert ours.dtype == torch.bfloat16 and ours.shape == (1, 128, height // 16, width // 16)
    assert torch.equal(ours, ref)


def test_noise_rejects_sizes_not_multiple_of_16():
    with pytest.raises(ValueError, match=r"^height 250 is not a multiple of 16; nearest valid: 240 or 256$"):
        get_noise(1, 250, 256, seed=0)


@pytest.mark.parametrize("num_steps", [1, 4, 10, 28, 50, 200, 250])
@pytest.mark.parametrize(
    "height, width", [(256, 256), (512, 512), (768, 1360), (1024, 1024), (1056, 1088), (2048, 2048)]
)
def test_schedule_equals_official(num_steps, height, width):
    n = (height // 16) * (width // 16)
    assert compute_empirical_mu(n, num_steps) == official_mu(n, num_steps)
    ours = get_schedule(num_steps, n)
    assert ours == official_schedule(num_steps, n)
    # float32 rounding can leave the first time at 0.99999994, exactly as the official code.
    assert len(ours) == num_steps + 1 and ours[0] == pytest.approx(1.0, abs=1e-6) and ours[-1] == 0.0


def test_schedule_sides_of_4300_tokens():
    # Above 4300 tokens mu no longer depends on the step count.
    assert compute_empirical_mu(4301, 10) == compute_empirical_mu(4301, 50)
    assert compute_empirical_mu(4300, 10) != compute_empirical_mu(4300, 50)


def test_image_and_text_ids_equal_official():
    x = get_noise(2, 64, 96, seed=[1, 2], dtype=torch.float32)
    txt = torch.randn(2, 7, 12)
    inp = prepare(x, txt)
    ref_img, ref_img_ids = batched(prc_img)(x)
    ref_txt, ref_txt_ids = batched(prc_txt)(txt)
    assert torch.equal(inp.img, ref_img) and torch.equal(inp.txt, ref_txt)
    assert inp.img_ids.dtype == ref_img_ids.dtype == torch.int64
    assert torch.equal(inp.img_ids, ref_img_ids) and torch.equal(inp.txt_ids, ref_txt_ids)
    assert inp.img_ids.shape == (2, 24, 4) and inp.txt_ids.shape == (2, 7, 4)
    # unpack is the official scatter_ids for the generated image.
    assert torch.equal(unpack(inp.img, 64, 96), torch.cat(scatter_ids(inp.img, inp.img_ids)).squeeze(2))
    # A batch-1 text is repeated.
    assert torch.equal(prepare(x, txt[:1]).txt, txt[:1].expand(2, -1, -1))


def test_reference_ids_equal_official():
    g = torch.Generator().manual_seed(0)
    refs = [
        torch.randn(1, 128, 3, 5, generator=g),
        torch.randn(1, 128, 4, 2, generator=g),
        torch.randn(1, 128, 2, 2, generator=g),
    ]
    ours = prepare_references(refs)
    tokens, ids = official_refs([r[0] for r in refs])
    assert torch.equal(ours.ids, ids) and ours.ids.dtype == torch.int64
    assert torch.equal(ours.img.to(torch.bfloat16), tokens)
    assert ours.ids[0, :, 0].unique().tolist() == [10, 20, 30]
    batch3 = prepare_references(refs, batch=3)
    assert batch3.img.shape == (3, 15 + 8 + 4, 128) and torch.equal(batch3.ids[2], ids[0])


@pytest.mark.parametrize(
    "w, h, n", [(640, 480, 1), (3000, 2000, 1), (3000, 2000, 2), (1025, 1023, 3), (777, 333, 2)]
)
def test_reference_size_equals_official(w, h, n):
    assert reference_size(w, h, n) == official_reference_size(w, h, n)


@pytest.mark.parametrize("with_refs", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_denoise_equals_official_loop_bit_for_bit(with_refs, dtype):
    g = torch.Generator().manual_seed(3)
    inp = prepare(get_noise(2, 64, 48, seed=5, dtype=dtype), torch.randn(1, 6, 8, generator=g).to(dtype))
    latents = [
        torch.randn(1, 128, 2, 3, generator=g).to(dtype),
        torch.randn(1, 128, 3, 3, generator=g).to(dtype),
    ]
    refs = prepare_references(latents, batch=2) if with_refs else None
    timesteps = get_schedule(4, inp.img.shape[1])
    model = StandIn(128, 8)
    with torch.no_grad():
        ours = denoise(
            model, inp.img, inp.img_ids, inp.txt, inp.txt_ids, timesteps, 4.0, references=refs, progress=False
        )
        ref = official_denoise(model, inp.img, inp.img_ids, inp.txt, inp.txt_ids, timesteps, 4.0,
                               img_cond_seq=refs.img if refs else None, img_cond_seq_ids=refs.ids if refs else None)  # fmt: skip
    assert ours.dtype == dtype and ours.shape == inp.img.shape
    assert torch.equal(ours, ref)
    # The model saw the reference tokens (and their ids) after the image's, and t in the latent dtype.
    shape, ids, t, guidance = model.calls[0]
    assert shape[1] == 12 + (6 + 9 if with_refs else 0)
    assert t.dtype == dtype and guidance.tolist() == [4.0, 4.0]
    if with_refs:
        assert ids[0, 12:, 0].unique().tolist() == [10, 20]


@pytest.mark.parametrize("with_refs", [False, True])
def test_denoise_with_our_flux2_in_bf16_is_the_official_loop_bit_for_bit(with_refs):
    # The whole bf16 denoise with the real (tiny) FLUX.2 transformer: the loop adds no rounding of its
    # own (the transformer itself is held to the official model.py in test_flux2_model.py).
    from tiny import tiny_flux2

    model = tiny_flux2(in_channels=128, context_in_dim=8).to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    inp = prepare(get_noise(1, 48, 32, seed=7, dtype=torch.bfloat16), torch.randn(1, 5, 8, generator=g).bfloat16())
    refs = prepare_references([torch.randn(1, 128, 2, 2, generator=g).bfloat16()], batch=1) if with_refs else None
    timesteps = get_schedule(3, inp.img.shape[1])
    with torch.no_grad():
        ours = denoise(model, inp.img, inp.img_ids, inp.txt, inp.txt_ids, timesteps, 4.0, references=refs,
                       progress=False)  # fmt: skip
        ref = official_denoise(model, inp.img, inp.img_ids, inp.txt, inp.txt_ids, timesteps, 4.0,
                               img_cond_seq=refs.img if refs else None, img_cond_seq_ids=refs.ids if refs else None)  # fmt: skip
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref)
    assert not torch.equal(ours, inp.img)


def test_denoise_without_guidance_passes_none_and_callback_sees_every_step():
    inp = prepare(get_noise(1, 32, 32, seed=0, dtype=torch.float32), torch.randn(1, 3, 8))
    model = StandIn(128, 8)
    seen = []
    denoise(model, inp.img, inp.img_ids, inp.txt, inp.txt_ids, get_schedule(3, 4), None, progress=False,
            callback=lambda step, t, t_next, img, pred: seen.append((step, t, t_next)))  # fmt: skip
    assert all(call[3] is None for call in model.calls)
    assert [s for s, _, _ in seen] == [0, 1, 2]


def test_denoise_rejects_mismatched_inputs():
    inp = prepare(get_noise(2, 32, 32, seed=0, dtype=torch.float32), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"^denoise expects img \(B, N, C\)"):
        denoise(
            StandIn(128, 8), inp.img, inp.img_ids, inp.txt[:1], inp.txt_ids, [1.0, 0.0], 4.0, progress=False
        )
    refs = prepare_references([torch.randn(1, 128, 2, 2)])
    with pytest.raises(ValueError, match=r"^references have batch 1, the image 2"):
        denoise(
            StandIn(128, 8),
            inp.img,
            inp.img_ids,
            inp.txt,
            inp.txt_ids,
            [1.0, 0.0],
            4.0,
            references=refs,
            progress=False,
        )
