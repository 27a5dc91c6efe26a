"""Named model presets: one dict, exact-name lookup.

Numbers from the official BFL release (`flux/util.py` configs) and the model cards.
"""

from dataclasses import dataclass, replace

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
    # Kontext models only: the (width, height) they were trained on; a conditioning image is fitted
    # to the closest in aspect ratio (official util.PREFERED_KONTEXT_RESOLUTIONS). Empty: text-to-image.
    kontext_resolutions: tuple[tuple[int, int], ...] = ()

    @property
    def kontext(self) -> bool:
        """Whether the model edits a conditioning image (Kontext) rather than drawing from text alone."""
        return bool(self.kontext_resolutions)


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


# FLUX.1 Kontext [dev]'s training resolutions, (width, height) (official flux/util.py).
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)  # fmt: skip


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
            name="flux-kontext-dev",
            params=_flux_12b(guidance_embed=True),
            ae_params=FLUX_AE,
            t5_max_length=512,
            shift_schedule=True,
            # official cli_kontext defaults: 30 steps, guidance 2.5
            default_steps=30,
            default_guidance=2.5,
            description="FLUX.1 Kontext [dev], image editing by instruction, dev-shaped (12B)",
            kontext_resolutions=KONTEXT_RESOLUTIONS,
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
            # Our own small Flux, trained from nothing on procedural cartoon faces at 64x64 by
            # `python -m fluxspace.mini.build`. Same classes as dev, every width scaled down; why
            # each size, and how it was built and measured: docs/flux_mini.md.
            name="flux-mini",
            params=FluxParams(
                in_channels=64,
                out_channels=64,
                vec_in_dim=128,
                context_in_dim=128,
                hidden_size=192,
                mlp_ratio=4.0,
                num_heads=3,
                depth=2,
                depth_single_blocks=4,
                axes_dim=(8, 28, 28),
                theta=10_000,
                qkv_bias=True,
                guidance_embed=False,  # true classifier-free guidance instead (denoise's cfg_scale)
            ),
            ae_params=AutoEncoderParams(
                resolution=64,
                in_channels=3,
                ch=32,
                out_ch=3,
                ch_mult=(1, 2, 2),  # 3 levels: downsampling 4, 8 px a token
                num_res_blocks=1,
                z_channels=16,
                # The trained encoder's latent normalisation, also in ae.safetensors' metadata.
                scale_factor=0.9234506943220233,
                shift_factor=-0.10634428896250404,
            ),
            t5_max_length=48,
            shift_schedule=True,
            default_steps=20,
            default_guidance=6.0,  # the true-CFG scale
            description="flux-mini: our small Flux trained on procedural cartoon faces, 64x64, true CFG",
            default_size=64,
        ),
    ]
}
# Kontext twins of our small models: the same weights' shapes, conditioned on an image to edit.
# flux-mini-kontext is flux-mini fine-tuned on the domain's instruction-edit pairs (fluxspace/mini/
# edit_pairs.py), at flux-mini's one training size; tiny-kontext is the random toy for tests.
PRESETS |= {
    p.name: p
    for p in (
        # true CFG 3 (flux-mini's 6 halves the edits' preservation of the other attributes on beard
        # edits: benchmarks/results/mini_kontext.md)
        replace(PRESETS["flux-mini"], name="flux-mini-kontext", kontext_resolutions=((64, 64),), default_guidance=3.0,
                description="flux-mini-kontext: flux-mini fine-tuned to edit a face by instruction, 64x64"),
        replace(PRESETS["tiny"], name="tiny-kontext", kontext_resolutions=((128, 128), (96, 160), (160, 96)),
                description="random toy Kontext model for tests"),
    )
}  # fmt: skip


def get_preset(name: str) -> Preset:
    """Exact-name lookup; an unknown name lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None
