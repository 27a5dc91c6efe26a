"""Pure math of the Flux transformer: rotary position embeddings and attention.

Mirrors `flux/math.py` of the official BFL release. Everything here is a plain function of tensors,
so a test (or a curious reader) can call it alone.

Letters: B batch, H heads, L tokens, D head dim.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA kernels in priority order, fastest exact kernel first; each is used only where it supports the
# inputs (dtype, head dim, device), else the next. MATH (the unfused formula) is the last resort.
# On Hopper (compute capability 9.x: H100, H200) cuDNN's fused attention beats the FlashAttention-2
# kernel PyTorch ships; on Ampere, Ada and Blackwell FlashAttention-2 is as fast or faster (measured
# in huggingface/transformers#48163). The CPU order is PyTorch's own (its flash kernel, then math),
# spelled out so the CPU takes the same path, bit for bit, with or without this entry point.
SDPA_PRIORITY = {
    "cuda": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cuda-sm90": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cpu": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
}


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for one position axis.

    Pair i of a head vector is rotated by the angle pos * theta^(-2i/dim). The angles are computed
    in float64 and returned as float32: positions above 256 lose whole radians in bf16.

    pos: (B, L) positions. Returns (B, L, dim/2, 2, 2) rotation matrices [[cos, -sin], [sin, cos]].
    """
    assert dim % 2 == 0, f"rope dim must be even, got {dim}"
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim  # (dim/2,)
    omega = 1.0 / (theta**scale)  # (dim/2,)
    angles = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)  # (B, L, dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)  # (B, L, dim/2, 4)
    return rearrange(out, "B L d (i j) -> B L d i j", i=2, j=2).float()  # (B, L, dim/2, 2, 2)


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate interleaved pairs (2i, 2i+1) of q and k (not the rotate-half layout).

    xq, xk: (B, H, L, D). freqs_cis: (B, 1, L, D/2, 2, 2). The rotation runs in float32 and the
    result is cast back to the input dtype, as the official code does.
    """
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)  # (B, H, L, D/2, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)  # (B, H, L, D/2, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]  # (B, H, L, D/2, 2)
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]  # (B, H, L, D/2, 2)
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


@torch.compiler.assume_constant_result  # fixed per device: torch.compile bakes the answer into the graph
def sdpa_priority(device: torch.device) -> list[SDPBackend] | None:
    """The SDPA_PRIORITY entry for `device`, None where PyTorch's default order stands (mps, ...)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return SDPA_PRIORITY["cuda-sm90"]
    return SDPA_PRIORITY.get(device.type)


def joint_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention of already rotated q, k. (B, H, L, D) -> (B, L, H*D).

    The one attention entry point of the model: the fastest exact kernel for the device (SDPA_PRIORITY).
    """
    priority = sdpa_priority(q.device)
    if priority is None:
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
    else:
        with sdpa_kernel(priority, set_priority=True):
            x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
    return rearrange(x, "B H L D -> B L (H D)")  # (B, L, H*D)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention over all tokens with RoPE on q and k (flux/math.py `attention`).

    q, k, v: (B, H, L, D); pe: (B, 1, L, D/2, 2, 2). Returns (B, L, H*D).
    """
    q, k = apply_rope(q, k, pe)  # (B, H, L, D)
    return joint_attention(q, k, v)  # (B, L, H*D)
