"""What a named FLUX.2 model is: its transformer size, autoencoder, text encoder and sampling defaults.

The instances live in the one PRESETS dict of flux_core/presets.py, beside FLUX.1's `Preset`; code
that takes any preset dispatches on `preset.family` ("flux1" or "flux2").

Guidance comes in three kinds across the FLUX.2 models:
- "embedded": FLUX.2 [dev] is guidance-distilled; the scale is an input of the transformer
  (`guidance_in`), one forward a step (official scripts/cli.py: guidance 4.0).
- "cfg": the undistilled FLUX.2 [klein] base models run true classifier-free guidance, two forwards
  a step (diffusers Flux2KleinPipeline, `is_distilled=False`, guidance_scale 4.0).
- "none": the distilled FLUX.2 [klein] models take no guidance at all (Flux2KleinPipeline with
  `is_distilled=True` ignores guidance_scale).
"""

from dataclasses import dataclass
from typing import ClassVar

from .autoencoder import AutoEncoderParams
from .model import Flux2Params

GUIDANCE_KINDS = ("embedded", "cfg", "none")


@dataclass(frozen=True)
class Flux2Preset:
    family: ClassVar[str] = "flux2"
    # FLUX.1's Kontext models take one image to edit (presets.Preset.kontext); FLUX.2 models take any
    # number of reference images as part of every model, so none is a Kontext model.
    kontext: ClassVar[bool] = False

    name: str
    params: Flux2Params
    ae_params: AutoEncoderParams
    text_encoder: str  # flux2/conditioner.py SPECS variant: "dev" (Mistral-Small-3.x) or "klein" (Qwen3)
    default_steps: int
    guidance: str  # one of GUIDANCE_KINDS (see above)
    default_guidance: float  # the embedded scale or the true-CFG scale; unused with guidance "none"
    default_size: tuple[int, int]  # (width, height) in pixels when the user gives neither
    description: str

    def __post_init__(self):
        if self.guidance not in GUIDANCE_KINDS:
            raise ValueError(
                f"guidance {self.guidance!r} of preset {self.name!r}; valid: {', '.join(GUIDANCE_KINDS)}"
            )
        if (self.guidance == "embedded") != self.params.guidance_embed:
            raise ValueError(
                f"preset {self.name!r}: guidance {self.guidance!r} needs a transformer "
                f"{'with' if self.guidance == 'embedded' else 'without'} guidance_in"
            )
        if self.params.in_channels != self.ae_params.latent_channels:
            raise ValueError(
                f"preset {self.name!r}: the transformer takes {self.params.in_channels} channels a token, the "
                f"autoencoder gives {self.ae_params.latent_channels}"
            )
