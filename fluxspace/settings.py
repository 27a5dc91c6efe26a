"""What decides an image besides the prompt, and the one place a model's defaults fill it in.

Every entry point (generate, edit_image, inversion, the baselines, sweeps, the CLI before it loads
anything) calls `SampleSettings.resolve`: None fields take the preset's defaults, then everything is
checked against the model's token size. Resolving twice changes nothing.
"""

import math
from dataclasses import dataclass, replace

from flux_core import Preset
from flux_core.sampling import PIXELS_PER_TOKEN, check_image_size

# Bounds checked before any work. FLUX.1 is trained up to about 2 MP; 4096 x 4096 is 8x that, and
# beyond it a run is a typo, not an experiment (its memory is checked separately: resources.py).
MAX_PIXELS = 4096 * 4096
# Rectified flows sample in 1-50 steps; 10,000 leaves room for any solver study.
MAX_STEPS = 10_000


@dataclass(frozen=True)
class SampleSettings:
    """Everything besides the prompt that decides an image. None means the preset's default."""

    width: int | None = None  # pixels; None: the preset's default_size (FLUX.1 1024, flux-mini 64)
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    cfg_scale: float | None = None  # None: the preset's scale for models trained for true CFG, else 1 (off)
    negative_prompt: str = ""
    parity: bool = False

    def resolved(self, preset: Preset, *, real_image: bool = False) -> "SampleSettings":
        """The preset's defaults filled in. real_image: true CFG stays off unless cfg_scale is given
        (a real image is inverted and reconstructed, and CFG pulls the reconstruction off the image)."""
        cfg = self.cfg_scale
        if cfg is None:  # dev models distil guidance into the model; the others need true CFG
            cfg = 1.0 if real_image or not true_cfg(preset) else preset.default_guidance
        size = preset.default_size  # FLUX.1: pixels a side; FLUX.2: (width, height)
        width, height = size if isinstance(size, tuple) else (size, size)
        return replace(
            self,
            width=self.width if self.width is not None else width,
            height=self.height if self.height is not None else height,
            steps=self.steps if self.steps is not None else preset.default_steps,
            guidance=self.guidance if self.guidance is not None else preset.default_guidance,
            cfg_scale=cfg,
        )

    def validate(self, pixels_per_token: int = PIXELS_PER_TOKEN) -> None:
        """Check what can be checked; sizes only once given (pixels_per_token: the model's, see FluxModels)."""
        if self.width is not None or self.height is not None:
            height = self.height if self.height is not None else pixels_per_token
            width = self.width if self.width is not None else pixels_per_token
            check_image_size(height, width, pixels_per_token)
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} px is {width * height:,} pixels; at most 4096 x 4096 = "
                                 f"{MAX_PIXELS:,} are sampled")  # fmt: skip
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1; got {self.steps!r}")
        if self.steps is not None and self.steps > MAX_STEPS:
            raise ValueError(f"steps must be at most {MAX_STEPS:,}; got {self.steps:,}")
        for name in ("guidance", "cfg_scale"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number; got {value!r}")

    def resolve(self, preset: Preset, pixels_per_token: int, *, real_image: bool = False) -> "SampleSettings":
        """resolved() then validate(): the settings a run uses, checked for this model."""
        s = self.resolved(preset, real_image=real_image)
        s.validate(pixels_per_token)
        return s


def true_cfg(preset) -> bool:
    """Whether the preset's model samples with true classifier-free guidance by default: FLUX.1 models
    without a guidance embedding that give a scale (flux-mini's 6; schnell, timestep-distilled, gives
    0: no guidance), FLUX.2 [klein] base models (flux_core/flux2/preset.py: guidance "cfg"). FLUX.2
    [klein] distilled takes no guidance at all."""
    if preset.family == "flux2":
        return preset.guidance == "cfg"
    return not preset.params.guidance_embed and preset.default_guidance > 0
