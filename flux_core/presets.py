"""Named model presets: one dict, exact-name lookup, FLUX.1 and FLUX.2.

Numbers from the official BFL releases (`flux/util.py` configs, `flux2/util.py` and
`scripts/cli.py`), diffusers' FLUX.2 pipelines and the model cards. Every preset has a `family`
("flux1": `Preset` below; "flux2": flux2/preset.py `Flux2Preset`); code that runs one family takes
its presets through `family_preset`, which refuses the other family's by name.
"""

from dataclasses import dataclass, replace
from typing import ClassVar

from .autoencoder import AutoEncoder, AutoEncoderParams
from .flux2.autoencoder import FLUX2_AE
from .flux2.autoencoder import AutoEncoder as Flux2AutoEncoder
from .flux2.autoencoder import AutoEncoderParams as Flux2AEParams
from .flux2.model import Flux2, Flux2Params, get_params
from .flux2.preset import Flux2Preset
from .formats import FAMILIES
from .model import Flux, FluxParams


@dataclass(frozen=True)
class Preset:
    """A FLUX.1 model (FLUX.2's: flux2/preset.py Flux2Preset)."""

    family: ClassVar[str] = "flux1"

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


# FLUX.2. Sizes: flux2/model.py SIZES. Defaults: [dev] official scripts/cli.py (1360 x 768, 50 steps,
# guidance 4.0); [klein] diffusers Flux2KleinPipeline (default_sample_size 128 x vae_scale_factor 8 =
# 1024 px a side) and the klein model cards (distilled: 4 steps, no guidance; base: 50 steps, true
# CFG 4.0). Base and distilled klein models have the same tensors: only the preset tells them apart.
def _klein(size: str, base: bool) -> Flux2Preset:
    n = size.removeprefix("flux2-klein-")
    return Flux2Preset(
        name=f"flux2-klein-base-{n}" if base else size,
        params=get_params(size),
        ae_params=FLUX2_AE,
        text_encoder="klein",
        default_steps=50 if base else 4,
        guidance="cfg" if base else "none",
        default_guidance=4.0 if base else 0.0,
        default_size=(1024, 1024),
        description=f"FLUX.2 [klein] {n.upper()} {'base (undistilled, true CFG)' if base else '(step-distilled, 4 steps)'}",
    )


PRESETS |= {
    p.name: p
    for p in (
        Flux2Preset(
            name="flux2-dev", params=get_params("flux2-dev"), ae_params=FLUX2_AE, text_encoder="dev",
            default_steps=50, guidance="embedded", default_guidance=4.0, default_size=(1360, 768),
            description="FLUX.2 [dev], guidance-distilled, 32B, Mistral-Small-3.x text encoder",
        ),
        _klein("flux2-klein-4b", base=False),
        _klein("flux2-klein-9b", base=False),
        _klein("flux2-klein-4b", base=True),
        _klein("flux2-klein-9b", base=True),
        Flux2Preset(
            # Random weights at toy size, for tests: the [dev] transformer layout (guidance_in), the
            # latent format of the real models (128 channels a token, 16 px a token: z 32, four AE
            # levels), and klein's Qwen3 text slot at the width of the tiny LLM the tests build
            # (hidden 16: 3 layers x 16 = 48 features a token).
            name="tiny-flux2",
            params=Flux2Params(
                in_channels=128, context_in_dim=48, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=2,
                axes_dim=(8, 8, 8, 8), theta=2000, mlp_ratio=3.0, guidance_embed=True,
            ),
            ae_params=Flux2AEParams(
                resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=32
            ),
            text_encoder="klein", default_steps=4, guidance="embedded", default_guidance=4.0, default_size=(128, 128),
            description="random toy FLUX.2 model for tests ([dev] transformer layout)",
        ),
    )
}  # fmt: skip

# tiny-flux2 with [dev]'s text encoder: a tiny random Mistral3 (width 16, 30 layers: the official layers
# 10, 20, 30 are read), so the [dev] text path runs end to end offline.
PRESETS["tiny-flux2-dev"] = replace(PRESETS["tiny-flux2"], name="tiny-flux2-dev", text_encoder="dev",
                                    description="random toy FLUX.2 [dev] model for tests (Mistral3 text encoder)")  # fmt: skip

AnyPreset = Preset | Flux2Preset
# The model classes a preset's params build, by family: (transformer, autoencoder).
MODEL_CLASSES = {"flux1": (Flux, AutoEncoder), "flux2": (Flux2, Flux2AutoEncoder)}


def get_preset(name: str) -> AnyPreset:
    """Exact-name lookup; an unknown name lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def family_presets(family: str) -> list[str]:
    """The names of one family's presets, sorted."""
    return sorted(n for n, p in PRESETS.items() if p.family == family)


def family_preset(preset: "str | AnyPreset", family: str, use: str = "") -> AnyPreset:
    """A preset (by name or as given) of `family`; another family's is refused, listing the valid names.

    use: what takes only this family, for the message (e.g. "load_flow_model"). An unknown name lists
    this family's presets."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(family_presets(family))}")
    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.family != family:
        what = f"; {use} takes {FAMILIES[family]} presets" if use else ""
        raise ValueError(
            f"preset {p.name!r} is a {FAMILIES[p.family]} model{what}: {', '.join(family_presets(family))}"
        )
    return p
