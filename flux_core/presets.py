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
    default_size: int = 1024  # pixels a side when the user gives no width or height (FLUX.1: 1024)


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
            default_size=128,
        ),
        Preset(
            # Our own small Flux, trained from nothing on procedural cartoon faces at 64x64
            # (issue 4; `python -m fluxspace.mini.build`). Same classes as dev, every width scaled
            # down so that all its files stay under 30 MB and the whole build runs on 2 CPU cores
            # (4.5 to 6 hours, measured stage by stage in docs/flux_mini.md).
            name="flux-mini",
            params=FluxParams(
                in_channels=64,  # 16 AE channels x 2 x 2 packing, as FLUX.1
                out_channels=64,
                vec_in_dim=128,  # width of our small CLIP text model (pooled vector)
                context_in_dim=128,  # width of our small T5 encoder (token features)
                # 3x the 64 values of a token: the model must carry both the clean image and the
                # noise part of the velocity target (a 128-wide pixel model with 192-value tokens
                # could not, issue 4).
                hidden_size=192,
                mlp_ratio=4.0,
                num_heads=3,  # head dim 64: half of FLUX.1's 128
                depth=2,  # double-stream blocks: text and image with their own weights
                depth_single_blocks=4,  # single-stream blocks, as FLUX.1's 19:38 ratio
                axes_dim=(8, 28, 28),  # FLUX.1's (16, 56, 56) halved with the head dim
                theta=10_000,
                qkv_bias=True,
                # No distilled guidance: flux-mini is trained with caption dropout and sampled
                # with true classifier-free guidance (denoise's cfg_scale).
                guidance_embed=False,
            ),
            ae_params=AutoEncoderParams(
                resolution=64,
                in_channels=3,
                ch=32,  # the smallest width GroupNorm(32) allows
                out_ch=3,
                ch_mult=(1, 2, 2),  # 3 levels: downsampling 4, 64 px -> 16x16 latents -> 64 tokens
                num_res_blocks=1,
                z_channels=16,
                # Measured by the build (shift = mean, scale = 1 / std of the trained encoder's
                # latents over 2,048 renders) and recorded in ae.safetensors' metadata too.
                scale_factor=0.9234506943220233,
                shift_factor=-0.10634428896250404,
            ),
            t5_max_length=48,  # the longest caption is 43 T5 tokens with its tokenizer; FLUX.1 uses 512
            shift_schedule=True,  # our get_schedule; at 64 tokens mu = 0.47, a mild shift
            default_steps=20,
            # The true-CFG scale (cfg_scale) recommended for flux-mini: on 128 prompts of tuning seed 7
            # (not the reported seed 0), adherence 97.0% at 6 against 96.0% at 4 (mini_quality's adherence section).
            default_guidance=6.0,
            description="flux-mini: our small Flux trained on procedural cartoon faces, 64x64, true CFG",
            default_size=64,  # its training size
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """Exact-name lookup; an unknown name lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None
