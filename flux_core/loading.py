"""Loading official Flux files, diffusers folders and our own checkpoints.

The model is built on the meta device (no memory), the file is read with safetensors memory-mapped,
tensor by tensor in the target dtype, and the tensors are assigned to the module tree with strict
key checking. Peak memory is therefore one model in the target dtype, never a float32 copy.

Module names equal the official keys (see layers.py), so an official single file needs no renaming;
a `model.diffusion_model.` prefix is accepted. A diffusers folder (transformer/ and vae/, sharded
or not) is converted on load with the one rename table in formats.py.

With no preset, the whole shape of the model is read from the file: pruned community models, our
own small model and test checkpoints load the same way. RoPE axes and theta are not in any tensor:
they come from the file's metadata when we wrote it, and from the official values for head dim 128.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .autoencoder import AutoEncoder, AutoEncoderParams
from .model import Flux, FluxParams
from .presets import FLUX_AE, Preset, get_preset

OFFICIAL_PREFIX = "model.diffusion_model."
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Shapes = dict[str, tuple[int, ...]]


class CheckpointError(ValueError):
    """A weight file that cannot be used as asked; the message says why and what is valid."""


# ----------------------------------------------------------------------------------------------
# Reading files


def read_header(path: str | os.PathLike) -> tuple[Shapes, dict[str, str], dict[str, str]]:
    """Shapes, dtypes and metadata of a .safetensors file, checked for truncation and corruption."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such weight file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > size - 8:
            raise CheckpointError(
                f"{path} is not a valid safetensors file (header length {n} for a file of {size} bytes): "
                "corrupt or not a .safetensors file"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    shapes, dtypes, end = {}, {}, 0
    for key, info in header.items():
        try:
            shapes[key] = tuple(int(s) for s in info["shape"])
            dtypes[key] = str(info["dtype"])
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{path} has a corrupt safetensors header entry for {key!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}; "
            "download or copy it again"
        )
    return shapes, dtypes, metadata


def strip_prefix(keys, prefix: str = OFFICIAL_PREFIX) -> dict[str, str]:
    """Map file keys to module keys, dropping the `model.diffusion_model.` prefix some files carry."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): k for k in keys}


def _diffusers_files(folder: Path) -> list[Path]:
    """The safetensors files of one diffusers component folder (one file, or shards + index json)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors file (expected diffusion_pytorch_model.safetensors)")
    return files


class _Source:
    """Where a model's tensors come from: one or more safetensors files, and the layout they use."""

    def __init__(self, files: list[Path], layout: str):
        self.files = files
        self.layout = layout  # "bfl" or "diffusers"
        self.shapes: Shapes = {}
        self.metadata: dict[str, str] = {}
        self._where: dict[str, tuple[Path, str]] = {}  # module-or-file key -> (file, key in file)
        for file in files:
            shapes, _, metadata = read_header(file)
            self.metadata.update(metadata)
            for key, file_key in strip_prefix(shapes).items():
                self.shapes[key] = shapes[file_key]
                self._where[key] = (file, file_key)

    def tensors(self, device, dtype) -> dict[str, Tensor]:
        """Read every tensor (memory-mapped, one at a time) into `dtype` on `device`."""
        out = {}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key, (file, file_key) in self._where.items():
            by_file.setdefault(file, []).append((key, file_key))
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key, file_key in keys:
                    out[key] = f.get_tensor(file_key).to(device=device, dtype=dtype)
        return out


def _source(path: str | os.PathLike, component: str) -> _Source:
    """Resolve a file or a diffusers folder for `component` ("transformer" or "vae")."""
    path = Path(path)
    if path.is_file():
        src = _Source([path], layout="bfl")
        if file_kind(src.shapes).startswith("diffusers-"):
            src.layout = "diffusers"  # a single diffusers-layout file, e.g. from `flux-weights convert`
        return src
    if path.is_dir():
        sub = path / component
        folder = sub if sub.is_dir() else path
        return _Source(_diffusers_files(folder), layout="diffusers")
    raise CheckpointError(f"no such weight file or folder: {path}")


# ----------------------------------------------------------------------------------------------
# What a file is, and the shape of the model it holds


def file_kind(shapes: Shapes) -> str:
    """'flux' (official transformer), 'ae' (official autoencoder), 'diffusers-flux', 'diffusers-ae' or 'unknown'."""
    if "img_in.weight" in shapes:
        return "flux"
    if "x_embedder.weight" in shapes:
        return "diffusers-flux"
    if "encoder.conv_in.weight" in shapes:
        return "diffusers-ae" if any(k.startswith("decoder.up_blocks.") for k in shapes) else "ae"
    return "unknown"


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
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def _bfl_shapes(src: _Source, convert) -> Shapes:
    if src.layout == "bfl":
        return src.shapes
    meta = {k: torch.empty(s, device="meta") for k, s in src.shapes.items()}
    return {k: tuple(v.shape) for k, v in convert(meta).items()}


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
    from .formats import diffusers_to_bfl_transformer

    if isinstance(preset, str):
        preset = get_preset(preset)
    dtype = resolve_dtype(dtype, device)
    src = _source(path, "transformer")
    kind = file_kind(src.shapes)
    if kind not in ("flux", "diffusers-flux"):
        hint = " (it looks like an autoencoder: use load_autoencoder)" if kind in ("ae", "diffusers-ae") else ""
        raise CheckpointError(f"{path} is not a Flux transformer{hint}")
    shapes = _bfl_shapes(src, diffusers_to_bfl_transformer)
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
        params = flux_params_from_shapes(shapes, src.metadata)
    with torch.device("meta"):
        model = Flux(params)
    check_shapes(_meta_shapes(model), shapes, f"{path} does not match {preset.name if preset else 'its inferred shape'}")
    state = src.tensors(device, dtype)
    if src.layout == "diffusers":
        state = diffusers_to_bfl_transformer(state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _ae_source(path: str | os.PathLike) -> tuple[_Source, Shapes]:
    """The autoencoder's source and its shapes in the official layout; raises if it is not an autoencoder."""
    from .formats import diffusers_to_bfl_ae

    src = _source(path, "vae")
    kind = file_kind(src.shapes)
    if kind not in ("ae", "diffusers-ae"):
        hint = " (it looks like a Flux transformer: use load_flow_model)" if kind.endswith("flux") else ""
        raise CheckpointError(f"{path} is not a Flux autoencoder{hint}")
    return src, _bfl_shapes(src, diffusers_to_bfl_ae)


def read_ae_params(path: str | os.PathLike) -> AutoEncoderParams:
    """The autoencoder config of a file or diffusers folder, from its header alone (nothing is loaded)."""
    src, shapes = _ae_source(path)
    return ae_params_from_shapes(shapes, src.metadata)


def load_autoencoder(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    params: AutoEncoderParams | None = None,
) -> AutoEncoder:
    """Load the autoencoder from ae.safetensors (official layout) or a diffusers folder's vae/.

    Channels and levels are read from the file; pass `params` to check the file against a config.
    """
    from .formats import diffusers_to_bfl_ae

    dtype = resolve_dtype(dtype, device)
    src, shapes = _ae_source(path)
    if params is None:
        params = ae_params_from_shapes(shapes, src.metadata)
    with torch.device("meta"):
        ae = AutoEncoder(params)
    check_shapes(_meta_shapes(ae), shapes, f"{path} does not match the autoencoder config")
    state = src.tensors(device, dtype)
    if src.layout == "diffusers":
        state = diffusers_to_bfl_ae(state)
    ae.load_state_dict(state, strict=True, assign=True)
    return ae.eval().requires_grad_(False)
