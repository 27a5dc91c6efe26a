"""A tiny random Flux / FLUX.2 and inputs for them, shared by the seam, edit, FLUX.2 and runtime tests."""

import dataclasses

import torch

from flux_core import Flux, get_preset
from flux_core.flux2.model import Flux2, Flux2Params
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


# ---------------------------------------------------------------------------------------------- FLUX.2

# Hidden 64, 2 heads, 2 + 2 blocks, float32: small enough for diffusers' converter (which, unlike
# FLUX.1's, does not assume the full width) and for sampling loops in tests.
TINY_FLUX2 = Flux2Params(
    in_channels=16, context_in_dim=24, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
    axes_dim=(8, 8, 8, 8), theta=2000, mlp_ratio=3.0,
)  # fmt: skip


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Normal weights (std 0.1 at this tiny width) and norm scales near 1: activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        t = torch.randn(v.shape, generator=g) * 0.1
        out[k] = 1.0 + t if k.endswith(".scale") else t
    return out


def tiny_flux2(guidance_embed: bool = True, seed: int = 0, **sizes) -> Flux2:
    """A tiny random FLUX.2 (TINY_FLUX2 with `sizes` such as depth=1 replaced), weights random_state_dict(seed)."""
    model = Flux2(dataclasses.replace(TINY_FLUX2, guidance_embed=guidance_embed, **sizes))
    model.load_state_dict(random_state_dict(model, seed), strict=True)
    return model.eval()


def tiny_flux2_inputs(p: Flux2Params, B=2, h=3, w=4, T=5, seed=1, guidance=True) -> dict:
    """Ids as the official sampling builds them: image (t, h, w, 0), text (0, 0, 0, l); the image sits
    at t=1 here so every axis carries a non-zero position somewhere."""
    g = torch.Generator().manual_seed(seed)
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.ones(h * w), hh.flatten(), ww.flatten(), torch.zeros(h * w)], dim=-1)  # (N, 4)
    txt_ids = torch.stack([torch.zeros(T)] * 3 + [torch.arange(T).float()], dim=-1)  # (T, 4)
    return dict(
        img=torch.randn(B, h * w, p.in_channels, generator=g),
        img_ids=img_ids.expand(B, -1, -1),
        timesteps=torch.tensor([0.93, 0.31][:B]),
        txt=torch.randn(B, T, p.context_in_dim, generator=g),
        txt_ids=txt_ids.expand(B, -1, -1),
        guidance=torch.tensor([4.0, 1.5][:B]) if guidance else None,
    )
