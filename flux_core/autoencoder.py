"""The Flux autoencoder: a KL-regularised convolutional VAE with 16 latent channels.

Mirrors `flux/modules/autoencoder.py` of the official BFL release (itself the LDM / Stable Diffusion
VAE without quant convs). Attribute names are the keys of the official `ae.safetensors`
(`encoder.down.{i}.block.{j}.conv1`, `decoder.mid.attn_1.q`, `decoder.up.{i}.upsample.conv`, ...),
so the official file loads with strict checking and no renaming: 244 tensors at the Flux preset.
Every width comes from `AutoEncoderParams`; nothing is hard-coded.

Images are in [-1, 1]. Latents are normalised as z = scale_factor * (mean - shift_factor), and
decoding undoes it: x = decoder(z / scale_factor + shift_factor).

Letters: B batch, C channels, H height, W width, L = H * W pixels treated as tokens.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# GroupNorm settings of every norm in the official autoencoder (flux/modules/autoencoder.py).
NORM_GROUPS = 32
NORM_EPS = 1e-6


@dataclass(frozen=True)
class AutoEncoderParams:
    resolution: int  # training resolution; bookkeeping only, no layer depends on it
    in_channels: int  # image channels (3)
    ch: int  # base width; level i has ch * ch_mult[i] channels
    out_ch: int  # decoded image channels (3)
    ch_mult: tuple[int, ...]  # one entry per resolution level; each level after the first halves H, W
    num_res_blocks: int  # ResnetBlocks per encoder level (the decoder uses one more)
    z_channels: int  # latent channels (16)
    scale_factor: float
    shift_factor: float

    @property
    def downsampling(self) -> int:
        """Image pixels per latent pixel along a side: 8 for FLUX.1's four levels."""
        return 2 ** (len(self.ch_mult) - 1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=NORM_EPS, affine=True)


def downsample_factor(params: AutoEncoderParams) -> int:
    """How many pixels one latent cell covers per side: 2 ** (len(ch_mult) - 1) (8 for Flux)."""
    return 2 ** (len(params.ch_mult) - 1)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as the projections."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        # One head: (B, 1, L, C) so SDPA attends across all pixels with scale 1/sqrt(C).
        q = rearrange(self.q(h), "b c h w -> b 1 (h w) c")  # (B, 1, L, C)
        k = rearrange(self.k(h), "b c h w -> b 1 (h w) c")  # (B, 1, L, C)
        v = rearrange(self.v(h), "b c h w -> b 1 (h w) c")  # (B, 1, L, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, L, C)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)  # (B, C, H, W)
        return x + self.proj_out(h)  # (B, C, H, W)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> 3x3 conv, twice, plus a skip (a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # A 1x1 conv only where the width changes; nn.Identity has no parameters, hence no key.
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        return self.nin_shortcut(x) + h  # (B, C_out, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. Pads right and bottom only (as the official code) so H, W halve exactly."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)  # (B, C, 2H, 2W)


class MidBlock(nn.Module):
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution (`encoder.mid`, `decoder.mid`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))  # (B, C, H, W)


class Level(nn.Module):
    """One resolution level: `block.{j}` ResnetBlocks, then an optional `downsample` or `upsample`.

    The official code builds these as bare `nn.Module()`s with an empty `attn` list (Flux has no
    attention at these levels); the keys are the same.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, resample: str | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_blocks))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * z_channels, H/f, W/f): [mean | logvar]."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        ch, ch_mult, n = params.ch, params.ch_mult, len(params.ch_mult)
        self.conv_in = nn.Conv2d(params.in_channels, ch, kernel_size=3, stride=1, padding=1)
        # Level i maps ch * ch_mult[i-1] -> ch * ch_mult[i] and halves H, W (all but the last level).
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList(
            Level(ch * in_mult[i], ch * ch_mult[i], params.num_res_blocks, "down" if i < n - 1 else None)
            for i in range(n)
        )
        block_in = ch * ch_mult[-1]
        self.mid = MidBlock(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * params.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # The official code keeps a list of every level's output but only ever reads the last one.
        h = self.conv_in(x)  # (B, C, H, W)
        for level in self.down:
            h = level(h)  # (B, C_i, H_i, W_i)
        h = self.mid(h)  # (B, C, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*Z, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        ch, ch_mult, n = params.ch, params.ch_mult, len(params.ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(params.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in)
        # up[i] works at ch * ch_mult[i] channels, the checkpoint's order (the official code builds
        # them lowest resolution first and prepends); its input comes from up[i+1], or mid for the last.
        in_widths = [ch * m for m in ch_mult[1:]] + [block_in]
        self.up = nn.ModuleList(
            Level(in_widths[i], ch * ch_mult[i], params.num_res_blocks + 1, "up" if i > 0 else None)
            for i in range(n)
        )
        self.norm_out = group_norm(ch * ch_mult[0])
        self.conv_out = nn.Conv2d(ch * ch_mult[0], params.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, C, h, w)
        h = self.mid(h)  # (B, C, h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, C_i, H_i, W_i)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, h*f, w*f)


class AutoEncoder(nn.Module):
    """Encoder + decoder + latent normalisation (`AutoEncoder` of flux/modules/autoencoder.py).

    No parameters beyond `encoder.*` and `decoder.*`: the official file has no quant convs.
    """

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, in_channels, H, W) in [-1, 1] -> latents (B, z_channels, H/f, W/f), f = 8 for Flux.

        Returns scale_factor * (mean - shift_factor) using the posterior mean, as diffusers'
        Flux pipelines and FLUX_FACTS do. The official BFL code draws a sample from the diagonal
        Gaussian instead (`DiagonalGaussian(sample=True)`); `sample=True` does that, and
        `generator` (on the device of `x`) makes the draw reproducible. Like the official code,
        logvar is not clamped (diffusers clamps it to [-30, 20]).
        """
        factor = downsample_factor(self.params)
        if x.ndim != 4 or x.shape[1] != self.params.in_channels:
            raise ValueError(
                f"encode expects images of shape (B, {self.params.in_channels}, H, W); got shape {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"image sides must be multiples of {factor} (the autoencoder downsamples by {factor}); "
                f"got H={height}, W={width}"
            )
        if generator is not None and not sample:
            raise ValueError(
                "generator is only used when sample=True; pass sample=True or drop the generator"
            )
        mean, logvar = torch.chunk(self.encoder(x), 2, dim=1)  # (B, Z, h, w) each
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise  # (B, Z, h, w)
        return self.params.scale_factor * (z - self.params.shift_factor)  # (B, Z, h, w)

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, z_channels, h, w) -> images (B, out_ch, h*f, w*f), roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.params.z_channels:
            raise ValueError(
                f"decode expects latents of shape (B, {self.params.z_channels}, h, w); got shape {tuple(z.shape)}"
            )
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)  # (B, out_ch, H, W)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))  # (B, out_ch, H, W)
