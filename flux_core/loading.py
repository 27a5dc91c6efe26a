"""Loading official Flux files, diffusers folders and our own checkpoints.

The model is built on the meta device (no memory), the file is read with safetensors memory-mapped,
tensor by tensor in the target dtype, and the tensors are assigned to the module tree with strict
key checking. Peak memory is therefore one model in the target dtype, never a float32 copy.

Module names equal the official keys (see layers.py), so an official single file needs no renaming;
a `model.diffusion_model.` prefix is accepted. A diffusers folder (transformer/ and vae/, sharded
or not) is converted on load with the one rename table in formats.py. Finding and reading the files
(headers, shards, the prefix, dtype names) is files.py's; this file builds the models.

With no preset, the whole shape of the model is read from the file (inference.py): pruned community
models, our own small model and test checkpoints load the same way. RoPE axes and theta are not in
any tensor: they come from the file's metadata when we wrote it, and from the official values for
head dim 128.

fp8 files (float8 weights, optionally with ComfyUI's per-layer `scale_weight`) load too: upcast to
the target dtype, or kept in fp8 with `weights="fp8"`; their layout is runtime/fp8.py's.

FLUX.2 files load through flux2/loading.py, which uses this file's checks and `build`; which family
a file is comes from its keys (formats.detect_family), and a file reaching the other family's loader
is refused naming the loader to use.

Every check is made on the headers before a tensor is read, and a file that fails one is refused
with a one-line CheckpointError naming it: the safetensors structure (files.read_header), our
metadata values (check_metadata), the shape inference (a missing tensor is listed, contradictory
shapes are named by their shapes) and every key and shape against the model to build
(check_flow_model / check_autoencoder, which `flux-weights verify` and `inspect` run too).
"""

import os

import torch

from .autoencoder import AutoEncoder, AutoEncoderParams
from .files import CheckpointError, Shapes, WeightFiles, dtype_named, open_weights
from .formats import FAMILIES, ConversionError
from .inference import (
    ae_params_from_shapes,
    check_metadata,
    check_shapes,
    detect_variant,
    flux_params_from_shapes,
    meta_model,
    model_shapes,
)
from .model import Flux, FluxParams
from .presets import Preset, family_preset, family_presets
from .runtime import fp8

# ----------------------------------------------------------------------------------------------
# Public loaders


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype, device) -> torch.dtype:
    """A torch dtype, a name from files.DTYPES, or None for the device's default."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        return dtype_named(dtype)
    return dtype


_MODEL_NAMES = {"transformer": "transformer", "ae": "autoencoder"}
_LOOKS_LIKE = {"transformer": "a Flux transformer", "ae": "an autoencoder"}
# The loader of each family's models, named when a file reaches another loader.
LOADERS = {
    ("flux1", "transformer"): "flux_core.loading.load_flow_model",
    ("flux1", "ae"): "flux_core.loading.load_autoencoder",
    ("flux2", "transformer"): "flux_core.flux2.loading.load_flux2_model",
    ("flux2", "ae"): "flux_core.flux2.loading.load_flux2_autoencoder",
}


def _loader(family: str, model: str) -> str:
    return LOADERS[(family, model)].rsplit(".", 1)[1]


def checked_shapes(files: WeightFiles, model: str, family: str = "flux1") -> Shapes:
    """The shapes of `model` ('transformer' or 'ae') of `family` under official names, with our
    metadata checked; raises if the files hold another model or another family's."""
    fmt = files.format
    what = _MODEL_NAMES[model]
    if fmt is None or fmt[1] != model:
        # What to say when the files hold the other model: the loader to use instead.
        hint = "" if fmt is None else f" (it looks like {_LOOKS_LIKE[fmt[1]]}: use {_loader(files.family, fmt[1])})"
        name = f"Flux {what}" if family == "flux1" else f"{FAMILIES[family]} {what}"
        raise CheckpointError(f"{files.path} is not a {name}{hint}")
    if files.family != family:
        found = FAMILIES[files.family]
        raise CheckpointError(
            f"{files.path} holds a {found} {what}, not a {FAMILIES[family]} one: load it with "
            f"{_loader(files.family, model)} (or with a {found} preset: {', '.join(family_presets(files.family))})"
        )
    try:
        check_metadata(files.metadata)
        return files.bfl_shapes()
    except (CheckpointError, ConversionError) as e:
        raise CheckpointError(f"{files.path}: {e}") from None


def infer_params(files: WeightFiles, infer, shapes: Shapes):
    """`infer(shapes, metadata)` (a *_params_from_shapes function), its refusal naming the files."""
    try:
        return infer(shapes, files.metadata)
    except CheckpointError as e:
        raise CheckpointError(f"{files.path}: {e}") from None


def check_flow_model(files: WeightFiles, preset: Preset | None = None) -> FluxParams:
    """Every check load_flow_model makes, on the headers alone: the params of the model it would load.

    preset: None infers the shape from the file; a preset is checked against the file (dev vs
    schnell, and every key and shape) and refused, saying what was found, if they disagree.
    """
    # An fp8 file's scale_weight (& co.) are keys of its layout, not of the model (runtime/fp8.py).
    shapes = fp8.module_shapes(checked_shapes(files, "transformer"), fp8.fp8_layout(files))
    if preset is not None:
        preset = family_preset(preset, "flux1", "load_flow_model")
        variant = detect_variant(shapes)
        wanted = "dev" if preset.params.guidance_embed else "schnell"
        if wanted != variant:
            found = "has guidance_in.* (a dev-type model)" if variant == "dev" else "has no guidance_in.* (a schnell-type model)"
            raise CheckpointError(
                f"{files.path} {found}, but preset {preset.name!r} is a {wanted}-type model; "
                f"use a {variant} preset or no preset"
            )
        params = preset.params
    else:
        params = infer_params(files, flux_params_from_shapes, shapes)
    mismatch = f"{files.path} does not match {preset.name if preset else 'its inferred shape'}"
    check_shapes(expected_shapes(Flux, params, files), shapes, mismatch)
    return params


def check_autoencoder(files: WeightFiles, params: AutoEncoderParams | None = None) -> AutoEncoderParams:
    """Every check load_autoencoder makes, on the headers alone: the params of the model it would load."""
    shapes = checked_shapes(files, "ae")
    if params is None:
        params = infer_params(files, ae_params_from_shapes, shapes)
    check_shapes(expected_shapes(AutoEncoder, params, files), shapes, f"{files.path} does not match the autoencoder config")
    return params


def expected_shapes(cls, params, files: WeightFiles) -> Shapes:
    """The state-dict shapes of `cls(params)`; params the model refuses are an error naming the files."""
    try:
        return model_shapes(cls, params)
    except CheckpointError as e:
        raise CheckpointError(f"{files.path}: {e}") from None


def build(cls, params, files: WeightFiles, device, dtype, weights: str = "full"):
    """`cls(params)` on the meta device, given the files' tensors (already checked against it), read
    memory-mapped one at a time and assigned with strict key checking.

    weights "fp8": the blocks' Linears become Fp8Linear first, from outside the model files
    (runtime/fp8.py); fp8 files are read through fp8.read_tensors either way."""
    model = meta_model(cls, params)
    if weights == "fp8":
        fp8.quantize_linears(model)
    model.load_state_dict(fp8.read_tensors(files, model, device, dtype), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def read_flux_params(path: str | os.PathLike) -> FluxParams:
    """The transformer config of a file or diffusers folder, from its headers alone (nothing is loaded),
    checked as load_flow_model checks it."""
    return check_flow_model(open_weights(path, "transformer"))


def load_flow_model(
    path: str | os.PathLike,
    preset: str | Preset | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    weights: str = "full",
) -> Flux:
    """Load a Flux transformer from an official single file or a diffusers folder.

    preset: None infers the shape from the file; a name is checked against the file (dev vs
    schnell, and every key and shape) and refused, saying what was found, if they disagree.
    Every check (check_flow_model) is made before a tensor is read.
    weights: "full" holds every weight in `dtype` (an fp8 file is upcast, times its scale_weight);
    "fp8" holds the blocks' Linear weights as float8 e4m3fn with a per-tensor scale and computes
    in `dtype` (runtime/fp8.py; a bf16 or float32 file is quantized as it is read).
    """
    if preset is not None:
        preset = family_preset(preset, "flux1", "load_flow_model")
    dtype = resolve_dtype(dtype, device)
    fp8.check_weights_format(weights, device)
    files = open_weights(path, "transformer")
    params = check_flow_model(files, preset)
    return build(Flux, params, files, device, dtype, weights)


def read_ae_params(path: str | os.PathLike) -> AutoEncoderParams:
    """The autoencoder config of a file or diffusers folder, from its headers alone (nothing is loaded),
    checked as load_autoencoder checks it."""
    return check_autoencoder(open_weights(path, "ae"))


def load_autoencoder(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    params: AutoEncoderParams | None = None,
) -> AutoEncoder:
    """Load the autoencoder from ae.safetensors (official layout) or a diffusers folder's vae/.

    Channels and levels are read from the file; pass `params` to check the file against a config.
    """
    dtype = resolve_dtype(dtype, device)
    files = open_weights(path, "ae")
    params = check_autoencoder(files, params)
    return build(AutoEncoder, params, files, device, dtype)
