"""Attention split over key blocks, merged exactly through log-sum-exp.

FluxSpace runs several text conditions (base, prior, edits) against the SAME image tokens. For the
image queries, softmax over [txt_c ; img] keys splits into a text part and an image part:

    out = (Z_txt * out_txt + Z_img * out_img) / (Z_txt + Z_img),   Z = exp(lse)

so the expensive image-image attention (N x N) is computed once and shared by every condition, and
each condition only adds its cheap image-text part (N x T). This is what keeps a FluxSpace step close
to the cost of a plain step. The fast kernels that also return the log-sum-exp are PyTorch's fused
attention kernels; `attention_with_lse_reference` is the plain formula they are tested against.

Letters: B batch, H heads, Q queries, S keys, D head dim.
"""

import math
import warnings

import torch
from torch import Tensor

_warned = False


def attention_with_lse_reference(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(D)) v and logsumexp of the logits, in float32. (B, H, Q, D) -> (B, H, Q, D), (B, H, Q)."""
    logits = torch.einsum("bhqd,bhsd->bhqs", q.float(), k.float()) / math.sqrt(q.shape[-1])  # (B, H, Q, S)
    lse = torch.logsumexp(logits, dim=-1)  # (B, H, Q)
    out = torch.einsum("bhqs,bhsd->bhqd", (logits - lse[..., None]).exp(), v.float())  # (B, H, Q, D)
    return out.to(q.dtype), lse


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Attention output (q's dtype) and its log-sum-exp (float32), through a fused kernel where one exists.

    The kernels follow flux_core.math.SDPA_PRIORITY where they can return the log-sum-exp: on CUDA
    FlashAttention (fp16/bf16, head dim <= 256), else the memory-efficient kernel; on the CPU the flash
    kernel. cuDNN, which the plain attention prefers on Hopper, is not used here: its log-sum-exp
    layout varies across cuDNN versions and has not been checked against the reference on a GPU, and
    a kernel that refuses its inputs inside a compiled graph cannot fall back the way this function
    does in eager mode.
    """
    global _warned
    try:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
            return out, lse.float()
        if q.device.type == "cuda":
            if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
            else:
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
            return out, lse[..., : q.shape[-2]].float()
    except (RuntimeError, NotImplementedError) as e:
        if not _warned:
            warnings.warn(f"fused attention with log-sum-exp unavailable ({e}); using the plain formula", stacklevel=2)
            _warned = True
    return attention_with_lse_reference(q, k, v)


def merge_attention(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Combine attention over disjoint key blocks into attention over all of them. Returns float32.

    parts: [(out_i (B, H, Q, D), lse_i (B, H, Q)), ...], each over its own keys.
    """
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)  # (B, H, Q)
    return sum((p[1] - lse).exp()[..., None] * p[0].float() for p in parts)  # (B, H, Q, D)
