"""The FLUX.2 autoencoder: official key layout (strict), parity with diffusers' AutoencoderKLFlux2
plus the BatchNorm normalisation as Flux2Pipeline applies it, the diffusers <-> official rename."""

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from test_autoencoder import randomise_, relative_error

from flux_core.flux2.autoencoder import (
    FLUX2_AE,
    AutoEncoder,
    AutoEncoderParams,
    diffusers_to_official,
    official_to_diffusers,
)

# Tiny: widths 32, 64, 64 (GroupNorm needs multiples of 32), 4 latent channels -> 16-channel tokens.
TINY = AutoEncoderParams(
    resolution=32, in_channels=3, ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4
)


def diffusers_config(p: AutoEncoderParams) -> dict:
    n = len(p.ch_mult)
    return dict(
        in_channels=p.in_channels, out_channels=p.out_ch, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(p.ch * m for m in p.ch_mult),
        layers_per_block=p.num_res_blocks, latent_channels=p.z_channels, norm_num_groups=32, sample_size=p.resolution,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pair() -> tuple[AutoEncoder, AutoencoderKLFlux2]:
    with torch.device("meta"):
        ours = AutoEncoder(TINY)
    ours = ours.to_empty(device="cpu").float().eval()
    randomise_(ours, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # running statistics far from (0, 1), so a skipped normalisation shows
        ours.bn.running_mean.copy_(torch.randn(16, generator=g))
        ours.bn.running_var.copy_(torch.rand(16, generator=g) * 3 + 0.2)
        ours.bn.num_batches_tracked.fill_(1234)
    ref = AutoencoderKLFlux2(**diffusers_config(TINY))
    ref.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref.float().eval()


def test_official_key_layout_at_the_preset():
    with torch.device("meta"):
        state = AutoEncoder(FLUX2_AE).state_dict()
    # FLUX.1's 244 tensors + encoder.quant_conv, decoder.post_quant_conv (weight, bias) + bn's 3 buffers.
    assert len(state) == 251
    shapes = {
        "encoder.conv_out.weight": (64, 512, 3, 3),
        "encoder.quant_conv.weight": (64, 64, 1, 1),
        "decoder.post_quant_conv.weight": (32, 32, 1, 1),
        "decoder.conv_in.weight": (512, 32, 3, 3),
        "bn.running_mean": (128,),
        "bn.running_var": (128,),
        "bn.num_batches_tracked": (),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert FLUX2_AE.latent_channels == 128 and FLUX2_AE.pixels_per_token == 16


def test_diffusers_default_config_is_the_official_preset():
    with torch.device("meta"):
        ref = AutoencoderKLFlux2()
    c = ref.config
    ours = diffusers_config(FLUX2_AE)
    theirs = {k: tuple(c[k]) if isinstance(c[k], list) else c[k] for k in ours}
    assert ours == theirs | {
        "sample_size": FLUX2_AE.resolution
    }  # diffusers' sample_size is tiling bookkeeping
    assert c.batch_norm_eps == 1e-4 and tuple(c.patch_size) == (2, 2)
    # Every diffusers tensor converts to an official key of our module, and back.
    with torch.device("meta"):
        ours = AutoEncoder(FLUX2_AE).state_dict()
        theirs = ref.state_dict()
    assert set(diffusers_to_official(theirs)) == set(ours)
    assert set(official_to_diffusers(ours)) == set(theirs)


def test_parity_with_diffusers_and_flux2pipeline_normalisation(pair):
    ours, ref = pair
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    with torch.no_grad():
        z = ours.encode(x)
        # Flux2Pipeline._encode_vae_image: argmax latent, patchify, (z - running_mean) / sqrt(running_var + eps).
        z_ref = Flux2Pipeline._patchify_latents(ref.encode(x).latent_dist.mode())
        z_ref = (z_ref - mean) / std
        assert z.shape == (2, 16, 4, 6)  # downsampling 4, then 2x2 patches
        err_enc = relative_error(z, z_ref)
        assert err_enc <= 1e-5

        # Flux2Pipeline's decode: z * std + mean, unpatchify, vae.decode. Same latents into both.
        image = ours.decode(z_ref)
        image_ref = ref.decode(Flux2Pipeline._unpatchify_latents(z_ref * std + mean)).sample
        assert image.shape == (2, 3, 32, 48)
        err_dec = relative_error(image, image_ref)
        assert err_dec <= 1e-5
    print(f"encode rel err {err_enc:.2e}, decode rel err {err_dec:.2e}")


def test_normalize_is_batchnorm_eval_and_inverse(pair):
    ours, _ = pair
    z = torch.randn(2, 16, 3, 3)
    bn = torch.nn.BatchNorm2d(16, eps=1e-4, affine=False).eval()
    bn.load_state_dict(ours.bn.state_dict())
    ours.train()  # our normalisation is eval-mode BatchNorm whatever the module's mode
    try:
        assert torch.equal(ours.normalize(z), bn(z))
        assert torch.allclose(ours.inv_normalize(ours.normalize(z)), z, atol=1e-5)
    finally:
        ours.eval()
    assert ours.bn.running_mean.equal(bn.running_mean)  # statistics untouched


def test_round_trip_of_the_rename_is_exact(pair):
    ours, _ = pair
    sd = ours.state_dict()
    back = diffusers_to_official(official_to_diffusers(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    fresh = AutoEncoder(TINY)
    fresh.load_state_dict(back, strict=True)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 24, 32), r"image sides must be multiples of 16 \(the autoencoder downsamples by 8, then 2x2 patches\); got H=24, W=32"),
        ((1, 4, 32, 32), r"encode expects images of shape \(B, 3, H, W\); got shape \(1, 4, 32, 32\)"),
    ],
)  # fmt: skip
def test_encode_rejects_bad_images(shape, message):
    ae = AutoEncoder(replace(TINY, ch_mult=(1, 2, 2, 2)))  # downsamples by 8, as the preset
    with pytest.raises(ValueError, match=f"^{message}$"):
        ae.encode(torch.zeros(shape))


def test_decode_rejects_bad_latents(pair):
    with pytest.raises(
        ValueError, match=r"^decode expects latents of shape \(B, 16, h, w\); got shape \(1, 4, 2, 2\)$"
    ):
        pair[0].decode(torch.zeros(1, 4, 2, 2))
