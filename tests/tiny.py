"""A tiny random Flux and inputs for it, shared by the seam and edit tests."""

import dataclasses

import torch

from flux_core import Flux, get_preset
from flux_core.sampling import img_ids, txt_ids


def tiny_model(depth: int = 2, single: int = 2, seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    return Flux(dataclasses.replace(get_preset("tiny").params, depth=depth, depth_single_blocks=single)).eval()


def tiny_inputs(model: Flux, B: int = 2, h: int = 3, w: int = 4, T: int = 6, t=(0.8, 0.3), seed: int = 1) -> dict:
    """Model inputs for an h x w grid of image tokens and T text tokens, random but seeded."""
    p = model.params
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(B, h * w, p.in_channels, generator=g),
        img_ids=img_ids(B, 16 * h, 16 * w),
        txt=torch.randn(B, T, p.context_in_dim, generator=g),
        txt_ids=txt_ids(B, T),
        timesteps=torch.tensor(t[:B]),
        y=torch.randn(B, p.vec_in_dim, generator=g),
        guidance=torch.full((B,), 3.5),
    )
