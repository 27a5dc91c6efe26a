"""The model a weight file holds, read from its headers: hyper-parameters inferred from tensor shapes,
our metadata values (parsed and checked), and the expected shape of every tensor of a model.

Nothing here reads a tensor. loading.py builds models with what this file infers; `flux-weights
inspect` and `verify` report it.
"""

import functools
import json
import math
import re

import torch

from .autoencoder import NORM_GROUPS, AutoEncoderParams
from .files import CheckpointError, Shapes
from .model import FluxParams
from .presets import FLUX_AE

# safetensors metadata keys our writers record (everything else is inferred from tensor shapes).
META_PRESET = "fluxspace.preset"
META_AXES_DIM = "fluxspace.axes_dim"
META_THETA = "fluxspace.theta"
META_SCALE_FACTOR = "fluxspace.scale_factor"
META_SHIFT_FACTOR = "fluxspace.shift_factor"
META_RESOLUTION = "fluxspace.resolution"
# Official RoPE layout of the 128-dim heads of FLUX.1 (flux/util.py configs): one entry per axis of the
# position ids, (index, row, column) in sampling.img_ids / txt_ids (FLUX.2's have 4: flux2/sampling.py).
OFFICIAL_AXES_DIM = (16, 56, 56)
OFFICIAL_THETA = 10_000


# ----------------------------------------------------------------------------------------------
# Our metadata: each value a string (files.read_header checks that), parsed and checked here


def _positive_int(text: str) -> int | None:
    return int(text) if re.fullmatch(r"[0-9]+", text) and int(text) > 0 else None


def _finite_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _nonzero_float(text: str) -> float | None:
    value = _finite_float(text)
    return value if value else None


def _axes(text: str) -> tuple[int, ...] | None:
    try:
        axes = json.loads(text, parse_constant=lambda name: None)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(axes, list) and len(axes) > 0
    ok = ok and all(type(a) is int and a > 0 and a % 2 == 0 for a in axes)
    return tuple(axes) if ok else None


# key -> (parser returning None for a bad value, what a valid value is).
METADATA_VALUES = {
    META_AXES_DIM: (_axes, "a JSON list of positive even integers (the RoPE dims of the id axes), e.g. [16, 56, 56]"),
    META_THETA: (_positive_int, "a positive integer, e.g. 10000"),
    META_RESOLUTION: (_positive_int, "a positive integer, e.g. 256"),
    META_SCALE_FACTOR: (_nonzero_float, "a finite non-zero number, e.g. 0.3611"),
    META_SHIFT_FACTOR: (_finite_float, "a finite number, e.g. 0.1159"),
}


def metadata_value(metadata: dict[str, str], key: str, default=None):
    """The parsed value of one of our metadata keys (METADATA_VALUES), `default` if absent."""
    if key not in metadata:
        return default
    parse, expected = METADATA_VALUES[key]
    value = parse(metadata[key])
    if value is None:
        raise CheckpointError(f"metadata {key!r} is {_short(metadata[key])}; expected {expected}")
    return value


def check_metadata(metadata: dict[str, str]) -> None:
    """Refuse a file whose metadata gives one of our keys a value of the wrong type."""
    for key in METADATA_VALUES:
        metadata_value(metadata, key)


def _short(text: str, limit: int = 60) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# What a file is, and the shape of the model it holds


def detect_variant(shapes: Shapes) -> str:
    """'dev' (guidance-distilled: has guidance_in) or 'schnell'. Krea-dev is dev-shaped."""
    return "dev" if any(k.startswith("guidance_in.") for k in shapes) else "schnell"


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def count_indices(shapes: Shapes, pattern: str) -> int:
    return len(_indices(shapes, pattern))


class Needed:
    """The tensors shape inference reads: collects the missing ones and checks each one's rank."""

    def __init__(self, shapes: Shapes, model: str):
        self.shapes, self.model, self.missing = shapes, model, []

    def __call__(self, key: str, dims: str) -> tuple[int, ...]:
        """The shape of `key`, with len(dims.split(", ")) positive dims; a placeholder if missing."""
        names = dims.split(", ")
        if key not in self.shapes:
            self.missing.append(key)
            return (1,) * len(names)
        shape = tuple(self.shapes[key])
        if len(shape) != len(names) or 0 in shape:
            raise CheckpointError(f"{key} has shape {shape}; expected ({dims}), each positive")
        return shape

    def check(self) -> None:
        if self.missing:
            raise CheckpointError(
                f"cannot infer the {self.model}'s shape: {len(self.missing)} missing: {_first(self.missing)}"
            )


def flux_params_from_shapes(shapes: Shapes, metadata: dict[str, str] | None = None) -> FluxParams:
    """Infer every hyper-parameter of a BFL-layout transformer from its tensor shapes.

    Raises CheckpointError (without the file's name) when a tensor it reads is missing or the
    shapes contradict each other; the loader then checks every other tensor against the result.
    """
    metadata = metadata or {}
    need = Needed(shapes, "Flux transformer")
    hidden, in_channels = need("img_in.weight", "hidden size, in channels")
    depth = count_indices(shapes, r"double_blocks\.(\d+)\.")
    depth_single = count_indices(shapes, r"single_blocks\.(\d+)\.")
    if depth:
        norm = "double_blocks.0.img_attn.norm.query_norm.scale"
        (head_dim,) = need(norm, "head dim")
        mlp_hidden = need("double_blocks.0.img_mlp.0.weight", "MLP width, hidden size")[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    elif depth_single:
        norm = "single_blocks.0.norm.query_norm.scale"
        (head_dim,) = need(norm, "head dim")
        linear1 = need("single_blocks.0.linear1.weight", "3 x hidden size + MLP width, hidden size")
        mlp_hidden = linear1[0] - 3 * hidden
        qkv_bias = True
    else:
        raise CheckpointError("the file has no double_blocks.* and no single_blocks.*: not a usable Flux model")
    out_channels = need("final_layer.linear.weight", "out channels, hidden size")[0]
    vec_in_dim = need("vector_in.in_layer.weight", "hidden size, vector width")[1]
    context_in_dim = need("txt_in.weight", "hidden size, context width")[1]
    need.check()
    num_heads = head_count(hidden, in_channels, head_dim, norm)
    if mlp_hidden <= 0:
        raise CheckpointError(
            f"single_blocks.0.linear1.weight {linear1} has {linear1[0]} rows: no room for the MLP after "
            f"q, k, v (3 x hidden size {hidden} = {3 * hidden})"
        )
    axes_dim = rope_axes(metadata, head_dim, norm, OFFICIAL_AXES_DIM, "16+56+56")
    return FluxParams(
        in_channels=in_channels,
        out_channels=out_channels,
        vec_in_dim=vec_in_dim,
        context_in_dim=context_in_dim,
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=num_heads,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=axes_dim,
        theta=metadata_value(metadata, META_THETA, OFFICIAL_THETA),
        qkv_bias=qkv_bias,
        guidance_embed=detect_variant(shapes) == "dev",
    )


def head_count(hidden: int, in_channels: int, head_dim: int, norm: str) -> int:
    """The number of heads: the hidden size (img_in.weight, (hidden, in channels)) over the head dim (read
    from the tensor `norm`), refused if it does not divide."""
    if hidden % head_dim:
        raise CheckpointError(
            f"{norm} {(head_dim,)} gives a head dim of {head_dim}, which does not divide the hidden size "
            f"{hidden} of img_in.weight {(hidden, in_channels)}"
        )
    return hidden // head_dim


def rope_axes(
    metadata: dict[str, str], head_dim: int, norm: str, official: tuple[int, ...], official_layout: str
) -> tuple[int, ...]:
    """The RoPE axes of a model whose heads are `head_dim` wide (read from the tensor `norm`).

    From our metadata, refused if it has another count of axes than the family's `official` axes
    (one per position-id axis) or does not sum to the head dim; else the official axes, which only
    fit the official head dim (the message spells them as `official_layout`, e.g. "16+56+56").
    """
    axes_dim = metadata_value(metadata, META_AXES_DIM)
    if axes_dim is None:
        if head_dim != sum(official):
            raise CheckpointError(
                f"cannot infer the RoPE axes for head dim {head_dim} (only the official {sum(official)} = "
                f"{official_layout} is known); pass a preset or record {META_AXES_DIM!r} in the file's metadata"
            )
        return official
    if len(axes_dim) != len(official):
        raise CheckpointError(
            f"metadata {META_AXES_DIM!r} {list(axes_dim)} has {len(axes_dim)} axes; this model's position ids have "
            f"{len(official)}"
        )
    if sum(axes_dim) != head_dim:
        raise CheckpointError(
            f"metadata {META_AXES_DIM!r} {list(axes_dim)} sums to {sum(axes_dim)}, but the tensors have head dim "
            f"{head_dim} ({norm} {(head_dim,)}); the metadata and the shapes disagree"
        )
    return axes_dim


def ae_params_from_shapes(shapes: Shapes, metadata: dict[str, str] | None = None) -> AutoEncoderParams:
    """Infer channels, levels and blocks of an official-layout autoencoder from its tensor shapes.

    scale_factor / shift_factor are not tensors: they come from our metadata, else the FLUX.1 values.
    Raises CheckpointError (without the file's name) as flux_params_from_shapes does.
    """
    metadata = metadata or {}
    need = Needed(shapes, "autoencoder")
    ch, in_channels = need("encoder.conv_in.weight", "channels, in channels, kh, kw")[:2]
    z_channels = need("decoder.conv_in.weight", "channels, z channels, kh, kw")[1]
    out_ch = need("decoder.conv_out.weight", "out channels, channels, kh, kw")[0]
    # Levels and blocks as numbered in the file; a gap in the numbers is reported by the loader's
    # key check as missing and unexpected keys.
    levels = _indices(shapes, r"encoder\.down\.(\d+)\.") or [0]
    widths = {i: need(f"encoder.down.{i}.block.0.conv2.weight", "channels, channels, kh, kw")[0] for i in levels}
    need.check()
    if ch % NORM_GROUPS:
        raise CheckpointError(
            f"encoder.conv_in.weight has {ch} output channels; the autoencoder's GroupNorm needs a multiple of "
            f"{NORM_GROUPS}"
        )
    odd = [i for i in levels if widths[i] % ch]
    if odd:
        i = odd[0]
        raise CheckpointError(
            f"encoder.down.{i}.block.0.conv2.weight has {widths[i]} output channels, not a multiple of the "
            f"{ch} channels of encoder.conv_in.weight"
        )
    return AutoEncoderParams(
        resolution=metadata_value(metadata, META_RESOLUTION, FLUX_AE.resolution),
        in_channels=in_channels,
        ch=ch,
        out_ch=out_ch,
        ch_mult=tuple(widths[i] // ch for i in levels),
        num_res_blocks=count_indices(shapes, rf"encoder\.down\.{levels[0]}\.block\.(\d+)\."),
        z_channels=z_channels,
        scale_factor=metadata_value(metadata, META_SCALE_FACTOR, FLUX_AE.scale_factor),
        shift_factor=metadata_value(metadata, META_SHIFT_FACTOR, FLUX_AE.shift_factor),
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


def _key(key: str) -> str:
    """A key as written, or its repr if it holds unprintable characters (a message stays one line)."""
    return key if key.isprintable() and key.strip() == key and key else repr(key)


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(_key(k) for k in keys[:n]) + more


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
                + ", ".join(f"{_key(k)} {tuple(found[k])} != {tuple(expected[k])}" for k in sorted(misshaped)[:5])
            )
        raise CheckpointError(f"{what}: " + "; ".join(parts))


def meta_model(cls, params):
    """`cls(params)` on the meta device (no memory); params the layers refuse are a CheckpointError."""
    try:
        with torch.device("meta"):
            return cls(params)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"the tensor shapes give {params}, which cannot be built: {' '.join(str(e).split())}") from None


@functools.lru_cache(maxsize=16)
def _model_shapes(cls, params) -> Shapes:
    return {k: tuple(v.shape) for k, v in meta_model(cls, params).state_dict().items()}


def model_shapes(cls, params) -> Shapes:
    """The state-dict shapes of `cls(params)` (Flux or AutoEncoder), cached: checking a file against
    a config builds the model once per config, not once per file."""
    return dict(_model_shapes(cls, params))
