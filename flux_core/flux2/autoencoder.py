"""The FLUX.2 autoencoder: FLUX.1's VAE with 32 latent channels, 1x1 quant convs and a BatchNorm
over 2x2-patchified latents.

Mirrors `src/flux2/autoencoder.py` of black-forest-labs/flux2. The encoder/decoder trunks are
FLUX.1's (same GroupNorm ResnetBlocks, mid attention, right/bottom-padded downsampling), so they are
imported from `flux_core.autoencoder`; FLUX.2 adds three things:
- `encoder.quant_conv` (1x1, 2Z -> 2Z) after the encoder and `decoder.post_quant_conv` (1x1, Z -> Z)
  before the decoder: the official file keeps them inside encoder/decoder, not at the top as LDM does;
- latents are patchified 2x2, (B, Z, h, w) -> (B, 4Z, h/2, w/2): this is the 128-channel grid the
  transformer's tokens come from (`prc_img` just flattens it);
- `bn`, a BatchNorm2d(4Z, eps=1e-4, affine=False) whose running statistics normalise the
  patchified latent; it always runs in eval mode (official `normalize` / `inv_normalize`), so it is
  a fixed per-channel standardisation learnt in training. No scale/shift factors as in FLUX.1.

Attribute names are the keys of the official `ae.safetensors` (251 tensors at the preset, including
`bn.num_batches_tracked`), so it loads strictly with no renaming.

Letters: B batch, Z latent channels, C = 4Z patchified channels, H/W image, h/w latent pixels.
"""

from dataclasses import dataclass

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..autoencoder import Decoder, Encoder
from ..formats import bfl_to_diffusers_ae, diffusers_to_bfl_ae

# Official AutoEncoder.__init__: self.bn_eps = 1e-4, self.bn_momentum = 0.1, self.ps = [2, 2].
BN_EPS = 1e-4
BN_MOMENTUM = 0.1  # unused at inference (eval mode); kept so the module equals the official one
PATCH = 2


@dataclass(frozen=True)
class AutoEncoderParams:
    """Official `AutoEncoderParams` of flux2/autoencoder.py; field names as FLUX.1's, which the
    shared Encoder/Decoder read (FLUX.2 has no scale_factor/shift_factor: the BatchNorm replaces them)."""

    resolution: int  # bookkeeping only
    in_channels: int  # image channels (3)
    ch: int  # base width; level i has ch * ch_mult[i] channels
    out_ch: int  # decoded image channels (3)
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int  # latent channels (32)

    @property
    def downsampling(self) -> int:
        """Image pixels per latent pixel along a side (8 at the preset)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per patchified latent cell, i.e. per transformer token, along a side (16)."""
        return PATCH * self.downsampling

    @property
    def latent_channels(self) -> int:
        """Channels of a normalised, patchified latent and of a transformer token: 4Z (128)."""
        return PATCH * PATCH * self.z_channels


# The official defaults (flux2/autoencoder.py AutoEncoderParams), used for FLUX.2 [dev] and [klein].
FLUX2_AE = AutoEncoderParams(
    resolution=256, in_channels=3, ch=128, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=32
)


class Encoder2(Encoder):
    """FLUX.1's encoder plus the official `encoder.quant_conv` (1x1) on its moments."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__(params)
        self.quant_conv = nn.Conv2d(2 * params.z_channels, 2 * params.z_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.quant_conv(super().forward(x))  # (B, 2Z, h, w)


class Decoder2(Decoder):
    """FLUX.1's decoder after the official `decoder.post_quant_conv` (1x1)."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__(params)
        self.post_quant_conv = nn.Conv2d(params.z_channels, params.z_channels, kernel_size=1)

    def forward(self, z: Tensor) -> Tensor:
        # The official decoder also casts to the up-blocks' dtype after `mid`; one dtype here, a no-op.
        return super().forward(self.post_quant_conv(z))  # (B, out_ch, H, W)


class AutoEncoder(nn.Module):
    """Images in [-1, 1] <-> normalised patchified latents (B, 4Z, H/16, W/16), as the sampler uses them."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder2(params)
        self.decoder = Decoder2(params)
        self.bn = nn.BatchNorm2d(
            params.latent_channels, eps=BN_EPS, momentum=BN_MOMENTUM, affine=False, track_running_stats=True
        )

    def normalize(self, z: Tensor) -> Tensor:
        """(z - running_mean) / sqrt(running_var + eps) per channel: the BatchNorm in eval mode.

        Computed with F.batch_norm(training=False), the function the official `self.bn.eval(); self.bn(z)`
        runs, without flipping the module's training flag behind the caller's back.
        """
        return F.batch_norm(z, self.bn.running_mean, self.bn.running_var, training=False, eps=self.bn.eps)

    def inv_normalize(self, z: Tensor) -> Tensor:
        """The inverse, written out as in the official `inv_normalize`."""
        std = rearrange((self.bn.running_var + self.bn.eps).sqrt(), "c -> 1 c 1 1")  # (1, C, 1, 1)
        mean = rearrange(self.bn.running_mean, "c -> 1 c 1 1")  # (1, C, 1, 1)
        return z * std + mean  # (B, C, h/2, w/2)

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, in_channels, H, W) -> normalised latents (B, 4Z, H/16, W/16).

        The posterior mean, as the official encode (no sampling); H and W must be multiples of 16.
        """
        step = self.params.pixels_per_token
        if x.ndim != 4 or x.shape[1] != self.params.in_channels:
            raise ValueError(
                f"encode expects images of shape (B, {self.params.in_channels}, H, W); got shape {tuple(x.shape)}"
            )
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(
                f"image sides must be multiples of {step} (the autoencoder downsamples by "
                f"{self.params.downsampling}, then 2x2 patches); got H={x.shape[-2]}, W={x.shape[-1]}"
            )
        mean, _logvar = self.encoder(x).chunk(2, dim=1)  # (B, Z, h, w) each
        z = rearrange(mean, "B Z (h ph) (w pw) -> B (Z ph pw) h w", ph=PATCH, pw=PATCH)  # (B, 4Z, h/2, w/2)
        return self.normalize(z)  # (B, 4Z, h/2, w/2)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, 4Z, h, w) -> images (B, out_ch, 16h, 16w), roughly in [-1, 1]."""
        channels = self.params.latent_channels
        if z.ndim != 4 or z.shape[1] != channels:
            raise ValueError(
                f"decode expects latents of shape (B, {channels}, h, w); got shape {tuple(z.shape)}"
            )
        z = self.inv_normalize(z)  # (B, 4Z, h, w)
        z = rearrange(z, "B (Z ph pw) h w -> B Z (h ph) (w pw)", ph=PATCH, pw=PATCH)  # (B, Z, 2h, 2w)
        return self.decoder(z)  # (B, out_ch, 16h, 16w)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))  # (B, out_ch, H, W)


# ----------------------------------------------------------------------------- diffusers layout

# (official ae.safetensors, diffusers AutoencoderKLFlux2): the tensors FLUX.1's autoencoder lacks.
# diffusers keeps the quant convs at the top (LDM style); the official file nests them. Everything
# else is FLUX.1's table (flux_core.formats.AE_RENAMES). diffusers 0.42 ships no single-file
# converter for this VAE; the round trip is checked against its AutoencoderKLFlux2 in the tests.
EXTRA_RENAMES: tuple[tuple[str, str], ...] = (
    ("encoder.quant_conv", "quant_conv"),
    ("decoder.post_quant_conv", "post_quant_conv"),
    ("bn", "bn"),
)


def _move(sd: dict[str, Tensor], out: dict[str, Tensor], src: int) -> None:
    for row in EXTRA_RENAMES:
        for key in [k for k in sd if k.startswith(row[src] + ".")]:
            out[row[1 - src] + key[len(row[src]) :]] = sd.pop(key)


def official_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official FLUX.2 ae.safetensors keys -> diffusers AutoencoderKLFlux2 keys."""
    sd, out = dict(sd), {}
    _move(sd, out, src=0)
    return {**bfl_to_diffusers_ae(sd), **out}


def diffusers_to_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKLFlux2 keys -> official FLUX.2 ae.safetensors keys (loads strictly here)."""
    sd, out = dict(sd), {}
    _move(sd, out, src=1)
    return {**diffusers_to_bfl_ae(sd), **out}
