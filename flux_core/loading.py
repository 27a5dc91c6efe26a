"""Loading official Flux files, diffusers folders and our own checkpoints.

The model is built on the meta device (no memory), the file is read with safetensors memory-mapped,
tensor by tensor in the target dtype, and the tensors are assigned to the module tree with strict
key checking. Peak memory is therefore one model in the target dtype, never a float32 copy.

Module names equal the official keys (see layers.py), so an official single file needs no renaming;
a `model.diffusion_model.` prefix is accepted. A diffusers folder (transformer/ and vae/, sharded
or not) is converted on load with the one rename table in formats.py. Finding and reading the files
(headers, shards, the prefix, dtype names) is files.py's; this file builds the models.

With no preset, the whole shape of the model is read from the file: pruned community models, our
own small model and test checkpoints load the same way. RoPE axes and theta are not in any tensor:
they come from the file's metadata when we wrote it, and from the official values for head dim 128.
"""

import json
import os
import re

import torch

from .autoencoder import AutoEncoder, AutoEncoderParams
from .files import CheckpointError, Shapes, WeightFiles, dtype_named, open_weights
from .model import Flux, FluxParams
from .presets import FLUX_AE, Preset, get_preset

# safetensors metadata keys our writers record (everything else is inferred from tensor shapes).
META_PRESET = "fluxspace.preset"
META_AXES_DIM = "fluxspace.axes_dim"
META_THETA = "fluxspace.theta"
META_SCALE_FACTOR = "fluxspace.scale_factor"
META_SHIFT_FACTOR = "fluxspace.shift_factor"
META_RESOLUTION = "fluxspace.resolution"
# Official RoPE layout of the 128-dim heads of FLUX.1 (flux/util.py configs).
OFFICIAL_AXES_DIM = (16, 56, 56)
OFFICIAL_THETA = 10_000


# ----------------------------------------------------------------------------------------------
# What a file is, and the shape of the model it holds


def detect_variant(shapes: Shapes) -> str:
    """'dev' (guidance-distilled: has guidance_in) or 'schnell'. Krea-dev is dev-shaped."""
    return "dev" if any(k.startswith("guidance_in.") for k in shapes) else "schnell"


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def flux_params_from_shapes(shapes: Shapes, metadata: dict[str, str] | None = None) -> FluxParams:
    """Infer every hyper-parameter of a BFL-layout transformer from its tensor shapes."""
    metadata = metadata or {}
    if "img_in.weight" not in shapes:
        raise CheckpointError("not a Flux transformer in the official layout: no img_in.weight")
    hidden, in_channels = shapes["img_in.weight"]
    depth = _count(shapes, r"double_blocks\.(\d+)\.")
    depth_single = _count(shapes, r"single_blocks\.(\d+)\.")
    if depth:
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    elif depth_single:
        head_dim = shapes["single_blocks.0.norm.query_norm.scale"][0]
        mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
        qkv_bias = True
    else:
        raise CheckpointError("the file has no double_blocks.* and no single_blocks.*: not a usable Flux model")
    if META_AXES_DIM in metadata:
        axes_dim = tuple(json.loads(metadata[META_AXES_DIM]))
    elif head_dim == sum(OFFICIAL_AXES_DIM):
        axes_dim = OFFICIAL_AXES_DIM
    else:
        raise CheckpointError(
            f"cannot infer the RoPE axes for head dim {head_dim} (only the official 128 = 16+56+56 is known); "
            f"pass a preset or record {META_AXES_DIM!r} in the file's metadata"
        )
    return FluxParams(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        vec_in_dim=shapes["vector_in.in_layer.weight"][1],
        context_in_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=axes_dim,
        theta=int(metadata.get(META_THETA, OFFICIAL_THETA)),
        qkv_bias=qkv_bias,
        guidance_embed=detect_variant(shapes) == "dev",
    )


def ae_params_from_shapes(shapes: Shapes, metadata: dict[str, str] | None = None) -> AutoEncoderParams:
    """Infer channels, levels and blocks of an official-layout autoencoder from its tensor shapes.

    scale_factor / shift_factor are not tensors: they come from our metadata, else the FLUX.1 values.
    """
    metadata = metadata or {}
    if "encoder.conv_in.weight" not in shapes or "decoder.conv_in.weight" not in shapes:
        raise CheckpointError("not a Flux autoencoder in the official layout: no encoder/decoder conv_in")
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels))
    return AutoEncoderParams(
        resolution=int(metadata.get(META_RESOLUTION, FLUX_AE.resolution)),
        in_channels=in_channels,
        ch=ch,
        out_ch=shapes["decoder.conv_out.weight"][0],
        ch_mult=ch_mult,
        num_res_blocks=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=shapes["decoder.conv_in.weight"][1],
        scale_factor=float(metadata.get(META_SCALE_FACTOR, FLUX_AE.scale_factor)),
        shift_factor=float(metadata.get(META_SHIFT_FACTOR, FLUX_AE.shift_factor)),
    )


def flux_metadata(params: FluxParams, preset: str | None = None) -> dict[str, str]:
    """What our writers record beside the tensors so that the loader needs no preset."""
    meta = {META_AXES_DIM: json.dumps(list(params.axes_dim)), META_THETA: str(params.theta)}
    if preset:
        meta[META_PRESET] = preset
    return meta


def ae_metadata(params: AutoEncoderParams) -> dict[str, str]:
    return {
        META_SCALE_FACTOR: repr(params.scale_factor),
        META_SHIFT_FACTOR: repr(params.shift_factor),
        META_RESOLUTION: str(params.resolution),
    }


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_shapes(expected: Shapes, found: Shapes, what: str) -> None:
    """Raise one error listing the first few missing, unexpected and mis-shaped keys."""
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    misshaped = [k for k in expected.keys() & found.keys() if tuple(expected[k]) != tuple(found[k])]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_first(unexpected)}")
        if misshaped:
            parts.append(
                f"{len(misshaped)} mis-shaped: "
                + ", ".join(f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in sorted(misshaped)[:5])
            )
        raise CheckpointError(f"{what}: " + "; ".join(parts))


def _meta_shapes(module: torch.nn.Module) -> Shapes:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


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


_MODEL_NAMES = {"transformer": "Flux transformer", "ae": "Flux autoencoder"}
# What to say when the files hold the other model: the loader to use instead.
_OTHER_MODEL_HINTS = {
    "transformer": " (it looks like an autoencoder: use load_autoencoder)",
    "ae": " (it looks like a Flux transformer: use load_flow_model)",
}


def _open(path: str | os.PathLike, model: str) -> tuple[WeightFiles, Shapes]:
    """The files of `model` ('transformer' or 'ae') at `path` and their shapes under official names;
    raises if they hold something else."""
    files = open_weights(path, model)
    fmt = files.format
    if fmt is None or fmt[1] != model:
        hint = "" if fmt is None else _OTHER_MODEL_HINTS[model]
        raise CheckpointError(f"{path} is not a {_MODEL_NAMES[model]}{hint}")
    return files, files.bfl_shapes()


def _build(cls, params, files: WeightFiles, shapes: Shapes, device, dtype, mismatch: str):
    """`cls(params)` on the meta device, checked against the file's shapes, then given its tensors."""
    with torch.device("meta"):
        model = cls(params)
    check_shapes(_meta_shapes(model), shapes, mismatch)
    model.load_state_dict(files.bfl_tensors(device, dtype), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def read_flux_params(path: str | os.PathLike) -> FluxParams:
    """The transformer config of a file or diffusers folder, from its header alone (nothing is loaded)."""
    files, shapes = _open(path, "transformer")
    return flux_params_from_shapes(shapes, files.metadata)


def load_flow_model(
    path: str | os.PathLike,
    preset: str | Preset | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> Flux:
    """Load a Flux transformer from an official single file or a diffusers folder.

    preset: None infers the shape from the file; a name is checked against the file (dev vs
    schnell, and every key and shape) and refused, saying what was found, if they disagree.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    dtype = resolve_dtype(dtype, device)
    files, shapes = _open(path, "transformer")
    variant = detect_variant(shapes)
    if preset is not None:
        wanted = "dev" if preset.params.guidance_embed else "schnell"
        if wanted != variant:
            found = "has guidance_in.* (a dev-type model)" if variant == "dev" else "has no guidance_in.* (a schnell-type model)"
            raise CheckpointError(
                f"{path} {found}, but preset {preset.name!r} is a {wanted}-type model; "
                f"use a {variant} preset or no preset"
            )
        params = preset.params
    else:
        params = flux_params_from_shapes(shapes, files.metadata)
    mismatch = f"{path} does not match {preset.name if preset else 'its inferred shape'}"
    return _build(Flux, params, files, shapes, device, dtype, mismatch)


def read_ae_params(path: str | os.PathLike) -> AutoEncoderParams:
    """The autoencoder config of a file or diffusers folder, from its header alone (nothing is loaded)."""
    files, shapes = _open(path, "ae")
    return ae_params_from_shapes(shapes, files.metadata)


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
    files, shapes = _open(path, "ae")
    if params is None:
        params = ae_params_from_shapes(shapes, files.metadata)
    return _build(AutoEncoder, params, files, shapes, device, dtype, f"{path} does not match the autoencoder config")
