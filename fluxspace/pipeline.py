"""Prompts -> images: load the four parts of a Flux model and sample with them.

The pieces (transformer, autoencoder, text encoders) come from flux_core; this file only decides
where to find them, which defaults apply, and strings sampling together:

    text encoders -> noise -> prepare -> schedule -> denoise -> unpack -> decode
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from flux_core import Flux, Preset, get_preset
from flux_core.autoencoder import AutoEncoder
from flux_core.loading import (
    META_PRESET,
    CheckpointError,
    detect_variant,
    file_kind,
    load_autoencoder,
    load_flow_model,
    read_header,
    resolve_dtype,
)
from flux_core.presets import PRESETS
from flux_core.sampling import (
    PIXELS_PER_TOKEN,
    check_image_size,
    denoise,
    get_noise,
    get_schedule,
    prepare,
    unpack,
)

from . import mini
from .images import tensor_to_pil

if TYPE_CHECKING:  # the text encoders pull in `transformers`: imported when a model is loaded
    from flux_core.conditioner import TextEncoders

TEXT_ENCODER_DIRS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclass(frozen=True)
class ModelPaths:
    """Where each part of a model lives. A diffusers folder serves as all three."""

    transformer: Path
    ae: Path
    text_encoders: Path


def _is_text_encoder_folder(folder: Path) -> bool:
    return all((folder / d).is_dir() for d in TEXT_ENCODER_DIRS)


def resolve_paths(model: str | os.PathLike, ae: str | None = None, text_encoders: str | None = None) -> ModelPaths:
    """Find the transformer, autoencoder and text encoders from what the user gave.

    model: a transformer .safetensors file (the AE is then `ae.safetensors` beside it and the text
    encoders the folder it sits in), a folder holding such a file and ae.safetensors, or a diffusers
    folder (transformer/, vae/, text_encoder*/, tokenizer*/). `ae` and `text_encoders` override.
    """
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(f"model not found: {model} (pass a .safetensors file or a model folder)")
    if model.is_dir() and (model / "transformer").is_dir():
        transformer, default_ae, default_te = model, model, model
    elif model.is_dir():
        candidates = sorted(p for p in model.glob("*.safetensors") if p.name != "ae.safetensors")
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise FileNotFoundError(
                f"{model} should hold exactly one transformer .safetensors besides ae.safetensors; found: {found}. "
                "Pass the transformer file itself instead."
            )
        transformer, default_ae, default_te = candidates[0], model / "ae.safetensors", model
    else:
        transformer, default_ae, default_te = model, model.parent / "ae.safetensors", model.parent
    ae_path = Path(ae) if ae else default_ae
    te_path = Path(text_encoders) if text_encoders else default_te
    if not ae_path.exists():
        raise FileNotFoundError(f"autoencoder not found at {ae_path}; pass --ae PATH/TO/ae.safetensors")
    if not _is_text_encoder_folder(te_path):
        missing = [d for d in TEXT_ENCODER_DIRS if not (te_path / d).is_dir()]
        raise FileNotFoundError(
            f"text encoders not found in {te_path} (missing {', '.join(d + '/' for d in missing)}); "
            "pass --text-encoders FOLDER laid out like the official repositories "
            "(text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)"
        )
    return ModelPaths(transformer, ae_path, te_path)


def resolve_preset(paths: ModelPaths, preset: str | None) -> Preset:
    """An explicit preset wins; else the preset our writers record in the file; else dev or schnell by keys."""
    if preset is not None:
        return get_preset(preset)
    if paths.transformer.is_file():
        shapes, _, metadata = read_header(paths.transformer)
        if metadata.get(META_PRESET) in PRESETS:
            return PRESETS[metadata[META_PRESET]]
        if file_kind(shapes) != "flux":
            raise CheckpointError(f"{paths.transformer} is not a Flux transformer")
        return PRESETS["flux-dev" if detect_variant(shapes) == "dev" else "flux-schnell"]
    has_guidance = _diffusers_has_guidance(paths.transformer / "transformer")
    return PRESETS["flux-dev" if has_guidance else "flux-schnell"]


def _diffusers_has_guidance(folder: Path) -> bool:
    return any(
        any(k.startswith("time_text_embed.guidance_embedder.") for k in read_header(f)[0])
        for f in folder.glob("*.safetensors")
    )


@dataclass
class FluxModels:
    """A loaded model: transformer, autoencoder, text encoders, and the preset giving its defaults."""

    flow: Flux
    ae: AutoEncoder
    text: "TextEncoders"
    preset: Preset
    paths: ModelPaths
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.flow.parameters()).dtype

    @property
    def pixels_per_token(self) -> int:
        """Image pixels along the side of one image token: 2 x the autoencoder's downsampling."""
        return 2 * self.ae.params.downsampling

    def sample_settings(self, settings: "SampleSettings | None") -> "SampleSettings":
        """settings (None: all defaults) with the preset's defaults filled in, checked for this model."""
        s = (settings or SampleSettings()).resolved(self.preset)
        s.validate(self.pixels_per_token)
        return s


def load_models(
    model: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    ae: str | None = None,
    text_encoders: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
) -> FluxModels:
    """Load transformer, autoencoder and text encoders; the preset is checked against the file.

    model: see resolve_paths; None loads the shipped flux-mini.
    """
    from flux_core.conditioner import load_text_encoders

    paths = resolve_paths(model if model is not None else mini.model_path(), ae, text_encoders)
    chosen = resolve_preset(paths, preset)
    dtype = resolve_dtype(dtype, device)
    flow = load_flow_model(paths.transformer, preset=chosen if preset else None, device=device, dtype=dtype)
    autoencoder = load_autoencoder(paths.ae, device=device, dtype=dtype)
    text = load_text_encoders(paths.text_encoders, t5_max_length=chosen.t5_max_length, device=device, dtype=dtype)
    return FluxModels(flow, autoencoder, text, chosen, paths, torch.device(device))


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

    def resolved(self, preset: Preset) -> "SampleSettings":
        steps = self.steps if self.steps is not None else preset.default_steps
        guidance = self.guidance if self.guidance is not None else preset.default_guidance
        cfg = self.cfg_scale
        if cfg is None:  # dev models distil guidance into the model; the others need true CFG
            cfg = 1.0 if preset.params.guidance_embed else preset.default_guidance
        width = self.width if self.width is not None else preset.default_size
        height = self.height if self.height is not None else preset.default_size
        return SampleSettings(width, height, steps, guidance, cfg, self.negative_prompt, self.parity)

    def validate(self, pixels_per_token: int = PIXELS_PER_TOKEN) -> None:
        """Check what can be checked; sizes only once given (pixels_per_token: the model's, see FluxModels)."""
        if self.width is not None or self.height is not None:
            check_image_size(
                self.height if self.height is not None else pixels_per_token,
                self.width if self.width is not None else pixels_per_token,
                pixels_per_token,
            )
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1; got {self.steps!r}")
        for name in ("guidance", "cfg_scale"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(torch.tensor(float(value))):
                raise ValueError(f"{name} must be a finite number; got {value!r}")


def sample_latents(
    models: FluxModels,
    prompts: list[str],
    seeds: list[int],
    settings: SampleSettings,
    *,
    progress: bool = True,
    callback=None,
) -> torch.Tensor:
    """Denoise one image per (prompt, seed) pair. Returns unpacked latents (B, C, h, w), float32."""
    if len(prompts) != len(seeds):
        raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    s = models.sample_settings(settings)
    device, dtype, ppt = models.device, models.dtype, models.pixels_per_token
    txt, vec = models.text(prompts)  # (B, T, C'), (B, C'')
    z = models.ae.params.z_channels
    noise = get_noise(len(seeds), s.height, s.width, seeds, z, device, torch.bfloat16, pixels_per_token=ppt)
    inp = prepare(noise if s.parity else noise.to(dtype), txt, vec)
    timesteps = get_schedule(s.steps, inp.img.shape[1], shift=models.preset.shift_schedule)
    neg_txt = neg_vec = None
    if s.cfg_scale != 1.0:
        neg_txt, neg_vec = models.text([s.negative_prompt])
    x = denoise(
        models.flow,
        inp.img,
        inp.img_ids,
        inp.txt,
        inp.txt_ids,
        inp.vec,
        timesteps,
        guidance=s.guidance,
        neg_txt=neg_txt,
        neg_vec=neg_vec,
        cfg_scale=s.cfg_scale,
        callback=callback,
        progress=progress,
        parity=s.parity,
    )
    return unpack(x.float(), s.height, s.width, ppt)


def decode(models: FluxModels, latents: torch.Tensor) -> list[Image.Image]:
    with torch.inference_mode():
        x = models.ae.decode(latents.to(models.dtype))  # (B, 3, H, W)
    return tensor_to_pil(x)


def generate(
    models: FluxModels,
    prompts: list[str],
    seeds: list[int],
    settings: SampleSettings | None = None,
    *,
    progress: bool = True,
) -> list[Image.Image]:
    """One image per (prompt, seed). Same seed, same image, whatever the batch around it."""
    latents = sample_latents(models, prompts, seeds, settings or SampleSettings(), progress=progress)
    return decode(models, latents)
