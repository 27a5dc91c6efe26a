"""The Flux autoencoder: official key layout, parity with diffusers' AutoencoderKL, errors, sampling."""

import inspect
import math

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from flux_core.autoencoder import AutoEncoder, downsample_factor
from flux_core.presets import FLUX_AE, get_preset

# diffusers' config of black-forest-labs/FLUX.1-dev/vae (AutoencoderKL, no quant convs).
DIFFUSERS_FLUX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with norms away from their (1, 0) init, so a swapped or missing norm shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and ".norm" in f".{name}" and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)  # GroupNorm scale
            elif p.ndim == 1:
                p.copy_(0.1 * noise)  # biases
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))  # conv weights, fan-in scaled


@pytest.fixture(scope="module")
def flux_ae_pair() -> tuple[AutoEncoder, AutoencoderKL]:
    # Build on meta and materialise without default init: randomise_ writes every parameter.
    with torch.device("meta"):
        ours = AutoEncoder(FLUX_AE)
    ours = ours.to_empty(device="cpu").float().eval()
    randomise_(ours, seed=0)

    with torch.device("meta"):
        ref = AutoencoderKL(**DIFFUSERS_FLUX_VAE_CONFIG)
    converted = convert_ldm_vae_checkpoint(ours.state_dict(), dict(ref.config))
    ref.load_state_dict(converted, strict=True, assign=True)
    return ours, ref.float().eval()


def test_diffusers_config_matches_our_preset():
    # Every key we pass is a real AutoencoderKL argument in the installed diffusers.
    assert set(DIFFUSERS_FLUX_VAE_CONFIG) <= set(inspect.signature(AutoencoderKL.__init__).parameters)
    config = DIFFUSERS_FLUX_VAE_CONFIG
    assert config["block_out_channels"] == tuple(FLUX_AE.ch * m for m in FLUX_AE.ch_mult)
    assert config["latent_channels"] == FLUX_AE.z_channels
    assert config["layers_per_block"] == FLUX_AE.num_res_blocks
    assert config["scaling_factor"] == FLUX_AE.scale_factor
    assert config["shift_factor"] == FLUX_AE.shift_factor


def test_parity_with_diffusers_autoencoder_kl(flux_ae_pair):
    ours, ref = flux_ae_pair
    norm_weights = [p for n, p in ours.named_parameters() if "norm" in n and n.endswith("weight")]
    assert not any(torch.allclose(w, torch.ones_like(w)) for w in norm_weights)

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scale, shift = FLUX_AE.scale_factor, FLUX_AE.shift_factor
    with torch.no_grad():
        z = ours.encode(x)
        z_ref = (ref.encode(x).latent_dist.mean - shift) * scale
        assert z.shape == (1, 16, 8, 8)
        assert relative_error(z, z_ref) <= 1e-5

        # Decode the same latents through both, so the decoder is compared on its own.
        image = ours.decode(z_ref)
        image_ref = ref.decode(z_ref / scale + shift).sample
        assert image.shape == (1, 3, 64, 64)
        assert relative_error(image, image_ref) <= 1e-5


def test_official_key_layout():
    with torch.device("meta"):
        state = AutoEncoder(FLUX_AE).state_dict()
    assert len(state) == 244
    expected_shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.mid.attn_1.norm.weight": (512,),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    # Levels without a resample step have none; the official file has no quant convs.
    assert not any(
        k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample", "quant")) for k in state
    )


@pytest.fixture(scope="module")
def tiny_ae() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(get_preset("tiny").ae_params).eval()


def test_tiny_round_trip_shapes(tiny_ae):
    assert downsample_factor(tiny_ae.params) == 8
    with torch.no_grad():
        z = tiny_ae.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
        assert z.shape == (1, 16, 8, 8)
        assert tiny_ae.decode(z).shape == (1, 3, 64, 64)
        assert tiny_ae(torch.zeros(2, 3, 32, 48)).shape == (2, 3, 32, 48)


@pytest.mark.parametrize(
    "shape, message",
    [
        (
            (1, 3, 60, 64),
            r"image sides must be multiples of 8 \(the autoencoder downsamples by 8\); got H=60, W=64",
        ),
        (
            (1, 3, 64, 12),
            r"image sides must be multiples of 8 \(the autoencoder downsamples by 8\); got H=64, W=12",
        ),
        ((1, 4, 64, 64), r"encode expects images of shape \(B, 3, H, W\); got shape \(1, 4, 64, 64\)"),
        ((3, 64, 64), r"encode expects images of shape \(B, 3, H, W\); got shape \(3, 64, 64\)"),
    ],
)
def test_encode_rejects_bad_images(tiny_ae, shape, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        tiny_ae.encode(torch.zeros(shape))


def test_decode_rejects_bad_latents(tiny_ae):
    with pytest.raises(
        ValueError, match=r"^decode expects latents of shape \(B, 16, h, w\); got shape \(1, 4, 8, 8\)$"
    ):
        tiny_ae.decode(torch.zeros(1, 4, 8, 8))


def test_generator_without_sample_is_an_error(tiny_ae):
    with pytest.raises(ValueError, match=r"^generator is only used when sample=True"):
        tiny_ae.encode(torch.zeros(1, 3, 16, 16), generator=torch.Generator().manual_seed(0))


def test_sampling_is_deterministic_per_generator(tiny_ae):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        mean = tiny_ae.encode(x)
        a = tiny_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        b = tiny_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        c = tiny_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, mean)
    # The default is the posterior mean: repeated calls agree exactly.
    assert torch.equal(mean, tiny_ae.encode(x))
