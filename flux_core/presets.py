"""Named model presets: one dict, exact-name lookup.

Numbers from the official BFL release (`flux/util.py` configs) and the model cards.
"""

from dataclasses import dataclass

from .autoencoder import AutoEncoderParams
from .model import FluxParams


@dataclass(frozen=True)
class Preset:
    name: str
    params: FluxParams
    ae_params: AutoEncoderParams
    t5_max_length: int  # T5 tokens per prompt (padded to this length)
    shift_schedule: bool  # dev: resolution-dependent time shift; schnell: plain linspace
    default_steps: int
    default_guidance: float  # distilled guidance (dev) or true-CFG scale where the model needs it
    description: str


# ae.safetensors of FLUX.1 (shared by dev, schnell and Krea-dev).
FLUX_AE = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)


def _flux_12b(guidance_embed: bool) -> FluxParams:
    return FluxParams(
        in_channels=64,
        out_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_heads=24,
        depth=19,
        depth_single_blocks=38,
        axes_dim=(16, 56, 56),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="flux-dev",
            params=_flux_12b(guidance_embed=True),
            ae_params=FLUX_AE,
            t5_max_length=512,
            shift_schedule=True,
            default_steps=50,
            default_guidance=3.5,
            description="FLUX.1 [dev], guidance-distilled, 12B",
        ),
        Preset(
            name="flux-schnell",
            params=_flux_12b(guidance_embed=False),
            ae_params=FLUX_AE,
            t5_max_length=256,
            shift_schedule=False,
            default_steps=4,
            default_guidance=0.0,
            description="FLUX.1 [schnell], timestep-distilled, 12B, 4 steps",
        ),
        Preset(
            # Same tensors as dev: only an explicit preset tells them apart.
            name="flux-krea-dev",
            params=_flux_12b(guidance_embed=True),
            ae_params=FLUX_AE,
            t5_max_length=512,
            shift_schedule=True,
            default_steps=28,
            default_guidance=4.5,
            description="FLUX.1 Krea [dev], a dev-shaped fine-tune",
        ),
        Preset(
            # Random weights at toy size, for tests and smoke runs; every code path of dev.
            name="tiny",
            params=FluxParams(
                in_channels=64,
                out_channels=64,
                vec_in_dim=32,
                context_in_dim=32,
                hidden_size=64,
                mlp_ratio=4.0,
                num_heads=2,
                depth=1,
                depth_single_blocks=2,
                axes_dim=(8, 12, 12),
                theta=10_000,
                qkv_bias=True,
                guidance_embed=True,
            ),
            ae_params=AutoEncoderParams(
                resolution=64,
                in_channels=3,
                ch=32,
                out_ch=3,
                ch_mult=(1, 1, 1, 1),
                num_res_blocks=1,
                z_channels=16,
                scale_factor=0.3611,
                shift_factor=0.1159,
            ),
            t5_max_length=16,
            shift_schedule=True,
            default_steps=4,
            default_guidance=3.5,
            description="random toy model for tests (dev layout)",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """Exact-name lookup; an unknown name lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None
