"""Building blocks of the Flux transformer, named after the official checkpoint keys.

Mirrors `flux/modules/layers.py` of the official BFL release: attribute names are the key names
(`img_attn.qkv`, `txt_mod.lin`, `linear1`, ...) so an official file loads with strict checking and
no renaming. Every width comes from the constructor arguments; nothing is hard-coded.

Letters: B batch, L tokens, C channels (hidden size), H heads, D head dim.
"""

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from .math import rope

# The timestep sinusoid multiplies t in [0, 1] by this (flux/modules/layers.py `time_factor`).
TIME_FACTOR = 1000.0
# LayerNorm / RMSNorm epsilon of the official code.
NORM_EPS = 1e-6


class EmbedND(nn.Module):
    """RoPE over several position axes: ids (B, L, n_axes) -> rotations (B, 1, L, D/2, 2, 2)."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        assert sum(axes_dim) == dim, f"axes_dim {axes_dim} must sum to the head dim {dim}"
        self.dim = dim
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)  # (B, 1, L, D/2, 2, 2)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = TIME_FACTOR) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 here, and only here): [cos | sin].

    t: (B,). Returns (B, dim) in t's dtype when t is floating point.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, used for the time, guidance and pooled-text embeddings.

    bias=False for FLUX.2, whose linears carry no bias (flux2/model.py `disable_bias=True`).
    """

    def __init__(self, in_dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalisation with a learned scale, computed in float32 (key `scale`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + NORM_EPS)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    """RMSNorm on queries and keys separately (keys `query_norm`, `key_norm`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        q = self.query_norm(q)
        k = self.key_norm(k)
        return q.to(v), k.to(v)


class SelfAttention(nn.Module):
    """Holds the parameters of one stream's attention: fused `qkv`, QK `norm`, output `proj`.

    FLUX.1 has a biased `proj` (and a biased `qkv` in dev/schnell); FLUX.2 has neither bias.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, C) -> normed q, k and v, each (B, H, L, D). Rows of `qkv` are [q | k | v]."""
        qkv = self.qkv(x)  # (B, L, 3*C)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor  # (B, 1, C)
    scale: Tensor  # (B, 1, C)
    gate: Tensor  # (B, 1, C)

    def modulate(self, x: Tensor) -> Tensor:
        """The adaptive LayerNorm update applied to an already normalised stream."""
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    """SiLU(vec) -> Linear -> (shift, scale, gate) once, or twice for a double block (key `lin`).

    FLUX.1 has one per block; FLUX.2 three for the whole model, without bias (flux2/layers.py).
    """

    def __init__(self, dim: int, double: bool, bias: bool = True):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each (B, 1, C)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    # Keys `.0` and `.2`: Linear, GELU(tanh), Linear.
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
    )


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)


class LastLayer(nn.Module):
    """Final adaptive LayerNorm and projection back to patch channels.

    `adaLN_modulation.1` gives [shift | scale] (diffusers stores [scale | shift]). bias=False for FLUX.2.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # each (B, C)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]  # (B, L, C)
        return self.linear(x)  # (B, L, out)
