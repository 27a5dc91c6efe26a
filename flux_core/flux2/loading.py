"""Loading FLUX.2 files: the transformer (official single file or diffusers folder) and the autoencoder.

The same machinery as FLUX.1 (flux_core/loading.py): headers first (files.open_weights), every key
and shape checked before a tensor is read, the model built on the meta device and the tensors read
memory-mapped, one at a time, in the target dtype, then assigned with strict key checking. A
`model.diffusion_model.` key prefix is accepted; a diffusers folder (transformer/ and vae/, sharded
with an index json or not) is converted on load by the rename tables of flux2/formats.py and
flux2/autoencoder.py. fp8 files and `weights="fp8"` work as for FLUX.1 (runtime/fp8.py: the Linears
of double_blocks.* and single_blocks.*; FLUX.2's shared modulations and embedders stay full).

Which family a file is comes from its keys (formats.detect_family): FLUX.2 files have the three
shared modulations (transformer) or the latent BatchNorm and quant convs (autoencoder). A FLUX.1
file given here, or a FLUX.2 file given to the FLUX.1 loaders, is refused by name.

With no preset the model's shape is read from the file: widths from the tensor shapes, block counts
from the keys, the guidance embedding from `guidance_in.*`; RoPE axes and theta from our metadata,
else the official (32, 32, 32, 32) and 2000 of head dim 128 (flux2/model.py Flux2Params).
"""

import os
from dataclasses import fields

import torch

from ..files import CheckpointError, Shapes, WeightFiles, open_weights
from ..formats import detect_family  # noqa: F401  (re-exported: the family of a key set)
from ..inference import (
    META_THETA,
    Needed,
    ae_params_from_shapes,
    check_shapes,
    count_indices,
    head_count,
    metadata_value,
    rope_axes,
)
from ..loading import build, checked_shapes, expected_shapes, infer_params, resolve_dtype
from ..presets import family_preset
from ..runtime import fp8
from .autoencoder import AutoEncoder, AutoEncoderParams
from .model import Flux2, Flux2Params
from .preset import Flux2Preset

# Official RoPE of the 128-dim heads (flux2/model.py Flux2Params: axes_dim [32, 32, 32, 32], theta 2000).
OFFICIAL_AXES_DIM = (32, 32, 32, 32)
OFFICIAL_THETA = 2000


def detect_flux2_variant(shapes: Shapes) -> str:
    """'dev' (guidance-distilled: has guidance_in) or 'klein' (no guidance embedding; distilled and base
    klein models have the same keys)."""
    return "dev" if any(k.startswith("guidance_in.") for k in shapes) else "klein"


# ----------------------------------------------------------------------------------------------
# The shape of the model a file holds


def flux2_params_from_shapes(shapes: Shapes, metadata: dict[str, str] | None = None) -> Flux2Params:
    """Every hyper-parameter of an official-layout FLUX.2 transformer, from its tensor shapes (and our
    metadata for RoPE). Raises CheckpointError (without the file's name) on a missing tensor or
    contradictory shapes; the loader then checks every other tensor against the result."""
    metadata = metadata or {}
    need = Needed(shapes, "FLUX.2 transformer")
    hidden, in_channels = need("img_in.weight", "hidden size, in channels")
    context_in_dim = need("txt_in.weight", "hidden size, context width")[1]
    depth = count_indices(shapes, r"double_blocks\.(\d+)\.")
    depth_single = count_indices(shapes, r"single_blocks\.(\d+)\.")
    if depth:
        norm = "double_blocks.0.img_attn.norm.query_norm.scale"
        (head_dim,) = need(norm, "head dim")
        mlp_hidden = need("double_blocks.0.img_mlp.0.weight", "2 x MLP width, hidden size")[0] // 2  # SwiGLU
    elif depth_single:
        norm = "single_blocks.0.norm.query_norm.scale"
        (head_dim,) = need(norm, "head dim")
        linear1 = need("single_blocks.0.linear1.weight", "3 x hidden size + 2 x MLP width, hidden size")
        mlp_hidden = (linear1[0] - 3 * hidden) // 2
    else:
        raise CheckpointError(
            "the file has no double_blocks.* and no single_blocks.*: not a usable FLUX.2 model"
        )
    need.check()
    num_heads = head_count(hidden, in_channels, head_dim, norm)
    if mlp_hidden <= 0:
        raise CheckpointError(
            f"the MLP width read from the blocks is {mlp_hidden}: the shapes are not a FLUX.2 model"
        )
    axes_dim = rope_axes(metadata, head_dim, norm, OFFICIAL_AXES_DIM, "4 x 32")
    return Flux2Params(
        in_channels=in_channels,
        context_in_dim=context_in_dim,
        hidden_size=hidden,
        num_heads=num_heads,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=axes_dim,
        theta=metadata_value(metadata, META_THETA, OFFICIAL_THETA),
        mlp_ratio=mlp_hidden / hidden,
        guidance_embed=detect_flux2_variant(shapes) == "dev",
    )


def flux2_ae_params_from_shapes(shapes: Shapes, metadata: dict[str, str] | None = None) -> AutoEncoderParams:
    """The FLUX.2 autoencoder's params: its encoder/decoder trunks are FLUX.1's, read by the same
    inference (inference.ae_params_from_shapes); FLUX.2 has no scale/shift factors (its BatchNorm
    normalises), so those are dropped."""
    trunk = ae_params_from_shapes(shapes, metadata)
    return AutoEncoderParams(**{f.name: getattr(trunk, f.name) for f in fields(AutoEncoderParams)})


# ----------------------------------------------------------------------------------------------
# Checks on the headers alone


def check_flux2_model(files: WeightFiles, preset: str | Flux2Preset | None = None) -> Flux2Params:
    """Every check load_flux2_model makes, on the headers alone: the params of the model it would load.

    preset: None infers the shape from the file; a preset is checked against the file ([dev] vs
    [klein], and every key and shape) and refused, saying what was found, if they disagree.
    """
    shapes = fp8.module_shapes(checked_shapes(files, "transformer", "flux2"), fp8.fp8_layout(files))
    if preset is not None:
        preset = family_preset(preset, "flux2", "load_flux2_model")
        variant = detect_flux2_variant(shapes)
        wanted = "dev" if preset.params.guidance_embed else "klein"
        if variant != wanted:
            found = (
                "has guidance_in.* (a [dev]-type model)"
                if variant == "dev"
                else "has no guidance_in.* (a [klein]-type model)"
            )
            raise CheckpointError(
                f"{files.path} {found}, but preset {preset.name!r} is a [{wanted}]-type model; "
                f"use a [{variant}]-type preset or no preset"
            )
        params = preset.params
    else:
        params = infer_params(files, flux2_params_from_shapes, shapes)
    mismatch = f"{files.path} does not match {preset.name if preset else 'its inferred shape'}"
    check_shapes(expected_shapes(Flux2, params, files), shapes, mismatch)
    return params


def check_flux2_autoencoder(files: WeightFiles, params: AutoEncoderParams | None = None) -> AutoEncoderParams:
    """Every check load_flux2_autoencoder makes, on the headers alone: the params of the model it would load."""
    shapes = checked_shapes(files, "ae", "flux2")
    if params is None:
        params = infer_params(files, flux2_ae_params_from_shapes, shapes)
    mismatch = f"{files.path} does not match the FLUX.2 autoencoder config"
    check_shapes(expected_shapes(AutoEncoder, params, files), shapes, mismatch)
    return params


def read_flux2_params(path: str | os.PathLike) -> Flux2Params:
    """The transformer config of a file or diffusers folder, from its headers alone (nothing is loaded)."""
    return check_flux2_model(open_weights(path, "transformer"))


# ----------------------------------------------------------------------------------------------
# Loaders


def load_flux2_model(
    path: str | os.PathLike,
    preset: str | Flux2Preset | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    weights: str = "full",
) -> Flux2:
    """Load a FLUX.2 transformer from an official single file (e.g. flux2-dev.safetensors) or a
    diffusers folder (transformer/ of a pipeline, sharded or not).

    preset: None infers the shape from the file; a name (flux2-dev, flux2-klein-4b, ...) is checked
    against the file. Every check (check_flux2_model) is made before a tensor is read.
    dtype: bf16 on a GPU, float32 on the CPU by default. weights: "full", or "fp8" to hold the blocks'
    Linear weights as float8 e4m3fn with a per-tensor scale (runtime/fp8.py).
    """
    if preset is not None:
        preset = family_preset(preset, "flux2", "load_flux2_model")
    dtype = resolve_dtype(dtype, device)
    fp8.check_weights_format(weights, device)
    files = open_weights(path, "transformer")
    params = check_flux2_model(files, preset)
    return build(Flux2, params, files, device, dtype, weights)


def load_flux2_autoencoder(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    params: AutoEncoderParams | None = None,
) -> AutoEncoder:
    """Load the FLUX.2 autoencoder from its ae.safetensors (official layout) or a diffusers folder's vae/.

    Channels and levels are read from the file; pass `params` to check the file against a config.
    The BatchNorm's num_batches_tracked keeps its integer dtype.
    """
    dtype = resolve_dtype(dtype, device)
    files = open_weights(path, "ae")
    params = check_flux2_autoencoder(files, params)
    return build(AutoEncoder, params, files, device, dtype)
