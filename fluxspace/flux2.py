"""FLUX.2 in the pipeline: what differs from FLUX.1 where a model is found, loaded and sampled.

The entry points (models.resolve_paths / resolve_preset / load_models, run.SamplingRun) dispatch on
the family once and come here for FLUX.2; everything else (settings, runtime, FluxSpace's schedule,
the Euler loop, decoding, PNG metadata) is shared. The model-level code is flux_core/flux2/.

Files, as the Hugging Face FLUX.2 repositories hold them:
    FLUX.2-dev/flux2-dev.safetensors  ae.safetensors  text_encoder/ (Mistral-Small-3.x)  tokenizer/
    FLUX.2-klein-4B/  a diffusers folder: transformer/  vae/  text_encoder/ (Qwen3)  tokenizer/
                      model_index.json (Flux2KleinPipeline, is_distilled), and the single file
                      flux-2-klein-4b.safetensors at its root
A transformer file finds its autoencoder as `ae.safetensors` beside it, else the `vae/` folder beside
it (the klein repositories ship only the diffusers autoencoder); the text encoder is the folder
beside it (text_encoder/ + tokenizer/). --ae and --text-encoders override.

Which preset: an explicit one (checked against the file's family and [dev]/[klein] kind); else the
preset our writers record; else a diffusers folder's model_index.json (Flux2Pipeline: dev;
Flux2KleinPipeline: klein, base when is_distilled is false); else [dev] by its guidance embedding,
and a [klein] file by its size (4B or 9B), distilled unless its file name says "base" (base and
distilled klein models have the same tensors).

A run (run.SamplingRun): 128-channel noise drawn as the official cli.py draws it, 4-axis ids, the
empirical-mu schedule, guidance as the preset says (dev: the distilled guidance embedding; klein: none;
klein base: true CFG with the negative prompt, "" by default, as diffusers' Flux2KleinPipeline), and
reference images as extra token sequences after the generated image's (flux_core/flux2/sampling.py).
"""

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from flux_core.files import CheckpointError, WeightFiles
from flux_core.flux2 import sampling as f2
from flux_core.flux2.conditioner import LAYOUT, check_folder, get_spec, load_text_encoder
from flux_core.flux2.loading import (
    check_flux2_autoencoder,
    check_flux2_model,
    load_flux2_autoencoder,
    load_flux2_model,
)
from flux_core.flux2.model import SIZES
from flux_core.flux2.preset import Flux2Preset
from flux_core.inference import META_PRESET
from flux_core.presets import PRESETS, family_presets

from .models import diffusers_index

if TYPE_CHECKING:
    from .models import FluxModels
    from .settings import SampleSettings

TEXT_FOLDERS = tuple(LAYOUT)  # text_encoder/, tokenizer/
AE_FILE = "ae.safetensors"


# ----------------------------------------------------------------------------------------------
# Where the files are, which preset they are


def find_parts(transformer: Path, default_ae: Path, default_te: Path, ae: str | None, text_encoders: str | None):
    """(autoencoder, text-encoder folder) of a FLUX.2 transformer; one-line errors naming what is missing."""
    ae_path = Path(ae) if ae else default_ae
    if not ae and not ae_path.exists() and (ae_path.parent / "vae").is_dir():
        ae_path = ae_path.parent  # a klein repository: its diffusers vae/ (open_weights(..., "ae") picks it)
    if not ae_path.exists():
        raise FileNotFoundError(f"FLUX.2 autoencoder not found at {ae_path} (nor a vae/ folder beside it); "
                                "pass --ae PATH/TO/ae.safetensors")  # fmt: skip
    te_path = Path(text_encoders) if text_encoders else default_te
    missing = [d + "/" for d in TEXT_FOLDERS if not (te_path / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"FLUX.2 text encoder not found in {te_path} (missing {', '.join(missing)}); pass --text-encoders "
            "FOLDER laid out like the FLUX.2 repositories (text_encoder/ with the LLM: Mistral-Small-3.x for "
            "[dev], Qwen3 for [klein]; tokenizer/)"
        )
    return ae_path, te_path


def check_preset(preset: Flux2Preset, files: WeightFiles) -> Flux2Preset:
    """An explicit FLUX.2 preset, checked against the file's [dev]/[klein] kind (every shape is checked on load)."""
    check_flux2_model(files, preset)
    return preset


def detect_preset(transformer: Path, files: WeightFiles) -> Flux2Preset:
    """The preset of a FLUX.2 transformer given without one (see the module docstring for the order)."""
    params = check_flux2_model(files)
    valid = ", ".join(family_presets("flux2"))
    recorded = files.metadata.get(META_PRESET)
    if recorded is not None:
        if recorded not in PRESETS or PRESETS[recorded].family != "flux2":
            raise CheckpointError(f"{transformer} records preset {recorded!r}, which is no FLUX.2 preset of this "
                                  f"version (FLUX.2 presets: {valid}); pass --preset NAME")  # fmt: skip
        return PRESETS[recorded]
    if params.guidance_embed:
        return PRESETS["flux2-dev"]
    index = diffusers_index(transformer)
    base = index.get("is_distilled") is False or (not index and re.search(r"base", transformer.name, re.I) is not None)
    for size, size_params in SIZES.items():
        if size.startswith("flux2-klein") and replace(size_params, guidance_embed=False) == params:
            return PRESETS[size.replace("klein-", "klein-base-") if base else size]
    raise CheckpointError(
        f"{transformer} is a FLUX.2 [klein]-type transformer of no known size ({params.hidden_size} wide, "
        f"{params.depth} + {params.depth_single_blocks} blocks); pass --preset NAME (FLUX.2 presets: {valid})"
    )


# ----------------------------------------------------------------------------------------------
# Loading: the family's loaders for models.load_models


def check_text(folder: Path, preset: Flux2Preset, context_in_dim: int) -> None:
    """The text-encoder folder holds the LLM the preset reads, as wide as the transformer's text input."""
    spec = get_spec(preset.text_encoder)
    check_folder(folder, spec)
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    width = config.get("text_config", config).get("hidden_size")  # Mistral3: under text_config
    if isinstance(width, int) and width * len(spec.output_layers) != context_in_dim:
        raise ValueError(
            f"the {spec.llm} in {folder} gives {len(spec.output_layers)} x {width} = "
            f"{len(spec.output_layers) * width} features a token, but the transformer takes {context_in_dim}: "
            "the text encoder belongs to another FLUX.2 model"
        )


def load_model(path, preset, device, dtype, weights):
    return load_flux2_model(path, preset=preset, device=device, dtype=dtype, weights=weights)


def load_ae(path, device, dtype):
    return load_flux2_autoencoder(path, device=device, dtype=dtype)


def load_text(folder, preset: Flux2Preset, device, dtype):
    return load_text_encoder(folder, preset.text_encoder, device=device, dtype=dtype)


def check_model(files: WeightFiles, preset: Flux2Preset | None):
    return check_flux2_model(files, preset)


def check_ae(files: WeightFiles):
    return check_flux2_autoencoder(files)


def text_length(preset: Flux2Preset) -> int:
    """Tokens a prompt is padded to (512: text_encoder.py MAX_LENGTH, Flux2KleinPipeline's max_sequence_length)."""
    return get_spec(preset.text_encoder).max_length


# ----------------------------------------------------------------------------------------------
# A run


def read_references(images) -> list[Image.Image]:
    """Reference images (a path, a PIL image, or a list of them) read, checked and fitted as the official
    default_prep fits them: scaled down (LANCZOS) above the pixel cap (2024^2 for one, 1024^2 each for
    several), then centre-cropped to multiples of 16 px; at least 64 px a side, aspect ratio at most 8."""
    from .inversion import read_image

    images = list(images) if isinstance(images, list | tuple) else [images]
    out = []
    for image in images:
        image = read_image(image)
        w, h = image.size
        if min(w, h) < MIN_REFERENCE_SIDE or max(w, h) > MAX_REFERENCE_ASPECT * min(w, h):
            where = f"{image.filename} " if getattr(image, "filename", "") else ""
            raise ValueError(f"reference image {where}is {w}x{h} px; FLUX.2 takes references of at least "
                             f"{MIN_REFERENCE_SIDE} px a side and an aspect ratio up to {MAX_REFERENCE_ASPECT}")  # fmt: skip
        capped = f2.capped_size(w, h, len(images))
        if capped != (w, h):
            image = image.resize(capped, Image.LANCZOS)
        cw, ch = f2.reference_size(w, h, len(images))
        left, top = (capped[0] - cw) // 2, (capped[1] - ch) // 2
        out.append(image.crop((left, top, left + cw, top + ch)) if (cw, ch) != capped else image)
    return out


# official sampling.py cap_min_pixels: max_ar=8, min_sidelength=64
MIN_REFERENCE_SIDE, MAX_REFERENCE_ASPECT = 64, 8


def encode_references(models: "FluxModels", images: list[Image.Image], batch: int) -> f2.References:
    """Fitted reference images encoded by the autoencoder, as one token sequence for a batch."""
    from .inversion import encode_latent

    return f2.prepare_references([encode_latent(models, image) for image in images], batch)


def prepare(models: "FluxModels", prompts: list[str], seeds: list[int], s: "SampleSettings"):
    """(inputs, timesteps, negative) of a FLUX.2 run: noise as the official cli.py draws it (bf16, a
    generator per seed), ids, the empirical-mu schedule, and the negative prompt's text under true CFG."""
    txt = models.text(prompts)  # (B, T, D)
    noise = f2.get_noise(len(seeds), s.height, s.width, seeds, models.ae_params.latent_channels, models.device)
    inp = f2.prepare(noise if s.parity else noise.to(models.dtype), txt)
    timesteps = f2.get_schedule(s.steps, inp.img.shape[1])
    negative = (models.text([s.negative_prompt]), None) if s.cfg_scale != 1.0 else (None, None)
    return inp, timesteps, negative


def velocity(models: "FluxModels", model, inp, txt, s: "SampleSettings", neg_txt, references) -> f2.Velocity:
    """The FLUX.2 model's velocity for a run, called in the model's dtype (the latent in the run's
    latent_dtype: t and guidance are built in it first, so parity mode rounds them as the official loop)."""
    guidance = s.guidance if models.params.guidance_embed else None  # klein has no guidance embedding
    return f2.Velocity(model, inp.img_ids, txt, inp.txt_ids, guidance, references=references, neg_txt=neg_txt,
                       cfg_scale=s.cfg_scale, dtype=models.dtype)  # fmt: skip


def unpack(latents: torch.Tensor, s: "SampleSettings") -> torch.Tensor:
    return f2.unpack(latents, s.height, s.width)
