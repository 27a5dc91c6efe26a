"""The two weight layouts of FLUX.1: the official BFL one (our module names) and diffusers'.

One explicit rename table per model plus the short list of tensors that are not a plain rename
(fused, half-swapped or reshaped). The four public functions read block counts and widths from the
keys and shapes they are given, never from a config, so they work for any width and depth, on meta
tensors too, and on any subset of a model as long as fused groups are complete (a streaming
converter can convert one block at a time). Values are never changed: every conversion is a rename,
a split/concatenation along dim 0, a half swap or a squeeze, so BFL -> diffusers -> BFL is exact.

Checked against diffusers 0.42 (`FluxTransformer2DModel`, `AutoencoderKL` and the converters in
`diffusers/loaders/single_file_utils.py`): see tests/test_formats.py.

Table syntax: a pattern names a module (or a full key) in each layout. A key matches when it equals
the pattern or continues it with `.` (the rest, e.g. `.weight`, is carried over). Placeholders:
`{i}`, `{j}` block indices kept as they are; `{u}` the decoder up-block index, which diffusers
counts from the other end (up.k <-> up_blocks.{n-1-k}); `{s}` either `encoder` or `decoder`.
"""

import re
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

# Some single-file checkpoints (ComfyUI / LDM style) prefix every transformer key with this.
BFL_PREFIX = "model.diffusion_model."


def strip_prefix(key: str) -> str:
    """`key` without the `model.diffusion_model.` prefix, if it has it (the module key it names)."""
    return key.removeprefix(BFL_PREFIX)


# ----------------------------------------------------------------------------------------------
# Transformer (flux1-dev / flux1-schnell.safetensors <-> diffusers FluxTransformer2DModel)

# (official BFL, diffusers): plain renames.
TRANSFORMER_RENAMES: tuple[tuple[str, str], ...] = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("double_blocks.{i}.img_mod.lin", "transformer_blocks.{i}.norm1.linear"),
    ("double_blocks.{i}.txt_mod.lin", "transformer_blocks.{i}.norm1_context.linear"),
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    ("double_blocks.{i}.img_attn.proj", "transformer_blocks.{i}.attn.to_out.0"),
    ("double_blocks.{i}.txt_attn.proj", "transformer_blocks.{i}.attn.to_add_out"),
    ("double_blocks.{i}.img_mlp.0", "transformer_blocks.{i}.ff.net.0.proj"),
    ("double_blocks.{i}.img_mlp.2", "transformer_blocks.{i}.ff.net.2"),
    ("double_blocks.{i}.txt_mlp.0", "transformer_blocks.{i}.ff_context.net.0.proj"),
    ("double_blocks.{i}.txt_mlp.2", "transformer_blocks.{i}.ff_context.net.2"),
    ("single_blocks.{i}.modulation.lin", "single_transformer_blocks.{i}.norm.linear"),
    ("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    ("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
    # linear2 takes [attn | mlp] columns; diffusers' proj_out is applied to cat([attn, mlp]) in the
    # same order, so this fused-looking tensor is a plain rename.
    ("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.proj_out"),
    ("final_layer.linear", "proj_out"),
)


@dataclass(frozen=True)
class Fused:
    """One official Linear whose output rows diffusers stores as several Linears, in this order.

    Every part but the last has as many rows as the layer has inputs (one head-block of width
    hidden: q, k, v); the last part takes the remaining rows (v again, or the MLP input).
    """

    bfl: str
    diffusers: tuple[str, ...]


TRANSFORMER_FUSED: tuple[Fused, ...] = (
    Fused(
        "double_blocks.{i}.img_attn.qkv",
        (
            "transformer_blocks.{i}.attn.to_q",
            "transformer_blocks.{i}.attn.to_k",
            "transformer_blocks.{i}.attn.to_v",
        ),
    ),
    Fused(
        "double_blocks.{i}.txt_attn.qkv",
        (
            "transformer_blocks.{i}.attn.add_q_proj",
            "transformer_blocks.{i}.attn.add_k_proj",
            "transformer_blocks.{i}.attn.add_v_proj",
        ),
    ),
    Fused(
        "single_blocks.{i}.linear1",
        (
            "single_transformer_blocks.{i}.attn.to_q",
            "single_transformer_blocks.{i}.attn.to_k",
            "single_transformer_blocks.{i}.attn.to_v",
            "single_transformer_blocks.{i}.proj_mlp",
        ),
    ),
)

# (official, diffusers) whose output rows are [shift | scale] officially and [scale | shift] in
# diffusers (AdaLayerNormContinuous). Swapped for weights and biases; block modulations do not swap.
TRANSFORMER_HALF_SWAPPED: tuple[tuple[str, str], ...] = (
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
)

# ----------------------------------------------------------------------------------------------
# Autoencoder (ae.safetensors <-> diffusers AutoencoderKL)

AE_RENAMES: tuple[tuple[str, str], ...] = (
    ("{s}.conv_in", "{s}.conv_in"),
    ("{s}.conv_out", "{s}.conv_out"),
    ("{s}.norm_out", "{s}.conv_norm_out"),
    ("{s}.mid.block_1", "{s}.mid_block.resnets.0"),
    ("{s}.mid.block_2", "{s}.mid_block.resnets.1"),
    ("{s}.mid.attn_1.norm", "{s}.mid_block.attentions.0.group_norm"),
    ("{s}.mid.attn_1.q", "{s}.mid_block.attentions.0.to_q"),
    ("{s}.mid.attn_1.k", "{s}.mid_block.attentions.0.to_k"),
    ("{s}.mid.attn_1.v", "{s}.mid_block.attentions.0.to_v"),
    ("{s}.mid.attn_1.proj_out", "{s}.mid_block.attentions.0.to_out.0"),
    # The shortcut rename must come before the block rename that would otherwise catch it.
    ("encoder.down.{i}.block.{j}.nin_shortcut", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut"),
    ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}"),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("decoder.up.{u}.block.{j}.nin_shortcut", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut"),
    ("decoder.up.{u}.block.{j}", "decoder.up_blocks.{u}.resnets.{j}"),
    ("decoder.up.{u}.upsample.conv", "decoder.up_blocks.{u}.upsamplers.0.conv"),
)

# Official modules that are 1x1 Conv2d (weight (C, C, 1, 1)) where diffusers has a Linear ((C, C)).
AE_CONV1X1_AS_LINEAR: tuple[str, ...] = (
    "{s}.mid.attn_1.q",
    "{s}.mid.attn_1.k",
    "{s}.mid.attn_1.v",
    "{s}.mid.attn_1.proj_out",
)

# ----------------------------------------------------------------------------------------------
# Pattern matching

_PLACEHOLDERS = {"i": r"\d+", "j": r"\d+", "u": r"\d+", "s": r"encoder|decoder"}


class ConversionError(ValueError):
    """A state dict that the tables cannot convert; the message lists the keys left over."""


@cache
def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern)
    for name, rx in _PLACEHOLDERS.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
    return re.compile(out + r"(?P<rest>\..+)?")


def _match(pattern: str, key: str) -> tuple[dict[str, str], str] | None:
    """Placeholders and the carried-over rest of `key` if it is `pattern` or continues it with '.'."""
    m = _regex(pattern).fullmatch(key)
    if m is None:
        return None
    fields = {k: v for k, v in m.groupdict().items() if k != "rest"}
    return fields, m.group("rest") or ""


def _fill(pattern: str, fields: dict[str, str], n_up: int | None = None) -> str:
    if "u" in fields:
        fields = {**fields, "u": str(n_up - 1 - int(fields["u"]))}
    return pattern.format(**fields)


def _rename(sd: dict[str, Tensor], out: dict[str, Tensor], table, src: int, n_up: int | None = None) -> None:
    """Move every key of `sd` that a table row covers into `out` under its other-layout name."""
    dst = 1 - src
    for key in list(sd):
        for row in table:
            hit = _match(row[src], key)
            if hit is not None:
                fields, rest = hit
                out[_fill(row[dst], fields, n_up) + rest] = sd.pop(key)
                break


def _check_done(sd: dict[str, Tensor], what: str) -> None:
    if sd:
        left = sorted(sd)
        more = f" (+{len(left) - 8} more)" if len(left) > 8 else ""
        raise ConversionError(
            f"cannot convert {len(left)} key(s) of this {what} state dict: {', '.join(left[:8])}{more}. "
            "Is it the right model and layout? (official BFL keys look like double_blocks.0.img_attn.qkv.weight "
            "and encoder.down.0.block.0.conv1.weight; diffusers keys like transformer_blocks.0.attn.to_q.weight "
            "and encoder.down_blocks.0.resnets.0.conv1.weight)"
        )


def _modules(sd: dict[str, Tensor], pattern: str) -> dict[str, dict[str, str]]:
    """Modules of `sd` matching `pattern` exactly (up to `.weight` / `.bias`) -> their placeholders."""
    found = {}
    for key in sd:
        hit = _match(pattern, key)
        if hit is not None and hit[1] in (".weight", ".bias"):
            found[key[: -len(hit[1])]] = hit[0]
    return found


def _swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ----------------------------------------------------------------------------------------------
# Transformer


def bfl_to_diffusers_transformer(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official Flux transformer keys (optionally `model.diffusion_model.`-prefixed) -> diffusers."""
    return bfl_to_diffusers_tables(sd, TRANSFORMER_RENAMES, TRANSFORMER_FUSED, TRANSFORMER_HALF_SWAPPED)


def diffusers_to_bfl_transformer(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers FluxTransformer2DModel keys -> official Flux transformer keys (no prefix)."""
    return diffusers_to_bfl_tables(sd, TRANSFORMER_RENAMES, TRANSFORMER_FUSED, TRANSFORMER_HALF_SWAPPED)


def bfl_to_diffusers_tables(sd: dict[str, Tensor], renames, fused_table, half_swapped) -> dict[str, Tensor]:
    """Official -> diffusers keys by the given tables (FLUX.1's above; FLUX.2's in flux2/formats.py)."""
    sd = {strip_prefix(k): v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    for fused in fused_table:
        for module, fields in _modules(sd, fused.bfl).items():
            if module + ".weight" not in sd:
                raise ConversionError(f"{module}.bias has no {module}.weight: cannot tell how to split it")
            hidden = sd[module + ".weight"].shape[1]  # input width = rows of one of q, k, v
            for suffix in (".weight", ".bias"):
                if module + suffix not in sd:
                    continue
                t = sd.pop(module + suffix)
                sizes = [hidden] * (len(fused.diffusers) - 1)
                sizes.append(t.shape[0] - sum(sizes))
                if sizes[-1] <= 0:
                    raise ConversionError(
                        f"{module}{suffix} has {t.shape[0]} rows, too few for {fused.diffusers}"
                    )
                for name, part in zip(fused.diffusers, t.split(sizes, dim=0), strict=True):
                    out[_fill(name, fields) + suffix] = part
    for bfl, diffusers in half_swapped:
        for suffix in (".weight", ".bias"):
            if bfl + suffix in sd:
                out[diffusers + suffix] = _swap_halves(sd.pop(bfl + suffix))
    _rename(sd, out, renames, src=0)
    _check_done(sd, "official-layout transformer")
    return out


def diffusers_to_bfl_tables(sd: dict[str, Tensor], renames, fused_table, half_swapped) -> dict[str, Tensor]:
    """diffusers -> official keys (no prefix) by the given tables."""
    sd = dict(sd)
    out: dict[str, Tensor] = {}
    for fused in fused_table:
        for module, fields in _modules(sd, fused.diffusers[0]).items():
            names = [_fill(p, fields) for p in fused.diffusers]
            for suffix in (".weight", ".bias"):
                present = [n + suffix in sd for n in names]
                if not any(present):
                    continue
                if not all(present):
                    missing = [n + suffix for n, p in zip(names, present, strict=True) if not p]
                    raise ConversionError(
                        f"{module}{suffix} is fused with {', '.join(missing)} in the official layout, "
                        "which this state dict lacks"
                    )
                out[_fill(fused.bfl, fields) + suffix] = torch.cat([sd.pop(n + suffix) for n in names], dim=0)
    for bfl, diffusers in half_swapped:
        for suffix in (".weight", ".bias"):
            if diffusers + suffix in sd:
                out[bfl + suffix] = _swap_halves(sd.pop(diffusers + suffix))
    _rename(sd, out, renames, src=1)
    _check_done(sd, "diffusers-layout transformer")
    return out


# ----------------------------------------------------------------------------------------------
# Autoencoder


def _num_up_blocks(sd: dict[str, Tensor], pattern: str) -> int | None:
    rx = re.compile(pattern)
    ids = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(ids) + 1 if ids else None


def bfl_to_diffusers_ae(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official ae.safetensors keys -> diffusers AutoencoderKL keys."""
    sd = dict(sd)
    n_up = _num_up_blocks(sd, r"decoder\.up\.(\d+)\.")
    for pattern in AE_CONV1X1_AS_LINEAR:
        for module in _modules(sd, pattern):
            w = sd[module + ".weight"]
            if w.ndim != 4 or w.shape[2:] != (1, 1):
                raise ConversionError(
                    f"{module}.weight should be a 1x1 conv weight (C, C, 1, 1); got {tuple(w.shape)}"
                )
            sd[module + ".weight"] = w[:, :, 0, 0]
    out: dict[str, Tensor] = {}
    _rename(sd, out, AE_RENAMES, src=0, n_up=n_up)
    _check_done(sd, "official-layout autoencoder")
    return out


def diffusers_to_bfl_ae(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL keys -> official ae.safetensors keys."""
    sd = dict(sd)
    n_up = _num_up_blocks(sd, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    _rename(sd, out, AE_RENAMES, src=1, n_up=n_up)
    _check_done(sd, "diffusers-layout autoencoder")
    for pattern in AE_CONV1X1_AS_LINEAR:
        for module in _modules(out, pattern):
            w = out.get(module + ".weight")
            if w is None:
                continue
            if w.ndim != 2:
                raise ConversionError(
                    f"diffusers weight for {module} should be a Linear (C, C); got {tuple(w.shape)}"
                )
            out[module + ".weight"] = w[:, :, None, None]
    return out


# ----------------------------------------------------------------------------------------------
# Which layout and model a set of keys holds


def detect_format(keys) -> tuple[str, str] | None:
    """(layout, model) with layout 'bfl' or 'diffusers' and model 'transformer' or 'ae'; None if unknown."""
    keys = {strip_prefix(k) for k in keys}
    if any(k.startswith(("double_blocks.", "single_blocks.", "img_in.")) for k in keys):
        return "bfl", "transformer"
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys):
        return "diffusers", "transformer"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")) for k in keys):
        return "bfl", "ae"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys):
        return "diffusers", "ae"
    return None


# The model families, by the names messages use.
FAMILIES = {"flux1": "FLUX.1", "flux2": "FLUX.2"}
# Keys that only FLUX.2 files have, in both layouts (the names are the same in diffusers but for the
# time embedder): the transformer's three shared modulations (flux2/model.py), present at any depth,
# and the autoencoder's latent BatchNorm and quant convs (flux2/autoencoder.py).
FLUX2_KEY_PREFIXES = (
    "double_stream_modulation_img.", "double_stream_modulation_txt.", "single_stream_modulation.",
    "time_guidance_embed.", "bn.", "encoder.quant_conv.", "decoder.post_quant_conv.", "quant_conv.", "post_quant_conv.",
)  # fmt: skip


def detect_family(keys) -> str | None:
    """'flux1' or 'flux2' for the keys of a transformer or autoencoder (either layout); None if neither.

    FLUX.1 and FLUX.2 share the block names (double_blocks.N.img_attn.qkv, encoder.down.N...), so the
    family is told by what only FLUX.2 has (FLUX2_KEY_PREFIXES)."""
    keys = {strip_prefix(k) for k in keys}
    if detect_format(keys) is None:
        return None
    return "flux2" if any(k.startswith(FLUX2_KEY_PREFIXES) for k in keys) else "flux1"


# FLUX.1's converters, (model, target layout) -> function; FLUX.2's are flux2/formats.py CONVERTERS.
CONVERTERS = {
    ("transformer", "diffusers"): bfl_to_diffusers_transformer,
    ("transformer", "bfl"): diffusers_to_bfl_transformer,
    ("ae", "diffusers"): bfl_to_diffusers_ae,
    ("ae", "bfl"): diffusers_to_bfl_ae,
}
