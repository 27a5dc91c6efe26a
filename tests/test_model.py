"""Parity of our transformer with diffusers' FluxTransformer2DModel, on random official-layout weights.

diffusers is the reference: its own converter (single_file_utils) maps the same official-layout state
dict into its module tree. Its converter assumes the full width (hidden 3072, 24 heads, mlp 4), so the
models are full width with one double and one single block, float32.
"""

import dataclasses

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from flux_core import Flux, get_preset
from flux_core.sampling import img_ids as make_img_ids
from flux_core.sampling import txt_ids as make_txt_ids
from weights_tools.diffusers_reference import diffusers_transformer


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Normal weights (std 0.02) and norm scales near 1: a forward on them stays in a sane range."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        t = torch.randn(v.shape, generator=g) * 0.02
        if k.endswith(".scale"):
            t = 1.0 + 10 * t
        out[k] = t
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def build_pair(variant: str, seed: int):
    params = dataclasses.replace(get_preset(f"flux-{variant}").params, depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        ours = Flux(params)
    ref = diffusers_transformer(params)
    sd = random_state_dict(ours, seed)
    ours.load_state_dict(sd, strict=True, assign=True)
    ref.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(dict(sd)), strict=True, assign=True)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_transformer_matches_diffusers(variant):
    ours, ref = build_pair(variant, seed=0 if variant == "dev" else 1)
    p = ours.params
    g = torch.Generator().manual_seed(2)
    B, h, w, T = 2, 4, 6, 7  # a 4x6 grid of packed patches, 7 text tokens
    img = torch.randn(B, h * w, p.in_channels, generator=g)
    txt = torch.randn(B, T, p.context_in_dim, generator=g)
    y = torch.randn(B, p.vec_in_dim, generator=g)
    t = torch.tensor([0.93, 0.31])
    guidance = torch.tensor([3.5, 1.0]) if p.guidance_embed else None
    img_ids = make_img_ids(B, 16 * h, 16 * w)
    txt_ids = make_txt_ids(B, T)
    with torch.inference_mode():
        out = ours(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=guidance)
        expected = ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            guidance=guidance,
            return_dict=False,
        )[0]
    assert out.shape == (B, h * w, p.out_channels)
    err = rel_err(out, expected)
    assert err <= 1e-5, f"relative error {err:.2e} vs diffusers"
    # The comparison is sensitive: a perturbed weight must break it.
    with torch.no_grad():
        ours.single_blocks[0].linear2.bias.add_(1e-2)
        out2 = ours(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=guidance)
    assert rel_err(out2, expected) > 1e-4


def test_dev_model_requires_guidance():
    model = Flux(get_preset("tiny").params)
    p = model.params
    with pytest.raises(ValueError, match=r"this model is guidance-distilled \(dev\): pass `guidance`"):
        model(
            img=torch.zeros(1, 4, p.in_channels),
            img_ids=make_img_ids(1, 32, 32),
            txt=torch.zeros(1, 3, p.context_in_dim),
            txt_ids=make_txt_ids(1, 3),
            timesteps=torch.tensor([0.5]),
            y=torch.zeros(1, p.vec_in_dim),
        )


def test_meta_model_counts_match_official_release():
    # 780 tensors in flux1-dev.safetensors, 776 in schnell (no guidance_in), 11.9B parameters.
    with torch.device("meta"):
        dev = Flux(get_preset("flux-dev").params)
        schnell = Flux(get_preset("flux-schnell").params)
    assert len(dev.state_dict()) == 780
    assert len(schnell.state_dict()) == 776
    assert sum(p.numel() for p in dev.parameters()) == 11_901_408_320
