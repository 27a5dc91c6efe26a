"""The two weight layouts of the FLUX.2 transformer: the official BFL one (our module names) and diffusers'.

One explicit rename table plus the tensors that are not a plain rename, in the table syntax of
flux_core/formats.py (whose matching machinery this reuses). Values are never changed, so
official -> diffusers -> official is exact.

Checked against diffusers 0.42 (`Flux2Transformer2DModel` and
`diffusers/loaders/single_file_utils.py` `convert_flux2_transformer_checkpoint_to_diffusers`): see
tests/test_flux2_model.py. Unlike FLUX.1, diffusers keeps the single blocks' fused `linear1`
(`attn.to_qkv_mlp_proj`) whole, so only the double blocks' qkv are split.
"""

from torch import Tensor

from ..formats import Fused, bfl_to_diffusers_tables, diffusers_to_bfl_tables
from .autoencoder import diffusers_to_official, official_to_diffusers
from .model import Flux2Params

# (official BFL, diffusers): plain renames.
TRANSFORMER_RENAMES: tuple[tuple[str, str], ...] = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    ("single_stream_modulation.lin", "single_stream_modulation.linear"),
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    ("double_blocks.{i}.img_attn.proj", "transformer_blocks.{i}.attn.to_out.0"),
    ("double_blocks.{i}.txt_attn.proj", "transformer_blocks.{i}.attn.to_add_out"),
    # SwiGLU: both layouts take SiLU of the first half of `.0`'s rows times the second half.
    ("double_blocks.{i}.img_mlp.0", "transformer_blocks.{i}.ff.linear_in"),
    ("double_blocks.{i}.img_mlp.2", "transformer_blocks.{i}.ff.linear_out"),
    ("double_blocks.{i}.txt_mlp.0", "transformer_blocks.{i}.ff_context.linear_in"),
    ("double_blocks.{i}.txt_mlp.2", "transformer_blocks.{i}.ff_context.linear_out"),
    ("single_blocks.{i}.linear1", "single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"),
    ("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.attn.to_out"),
    ("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    ("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
    ("final_layer.linear", "proj_out"),
)

TRANSFORMER_FUSED: tuple[Fused, ...] = (
    Fused(
        "double_blocks.{i}.img_attn.qkv",
        ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k", "transformer_blocks.{i}.attn.to_v"),
    ),
    Fused(
        "double_blocks.{i}.txt_attn.qkv",
        (
            "transformer_blocks.{i}.attn.add_q_proj",
            "transformer_blocks.{i}.attn.add_k_proj",
            "transformer_blocks.{i}.attn.add_v_proj",
        ),
    ),
)

# Output rows [shift | scale] officially, [scale | shift] in diffusers (AdaLayerNormContinuous).
TRANSFORMER_HALF_SWAPPED: tuple[tuple[str, str], ...] = (("final_layer.adaLN_modulation.1", "norm_out.linear"),)


def bfl_to_diffusers_transformer(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official FLUX.2 transformer keys (optionally `model.diffusion_model.`-prefixed) -> diffusers."""
    return bfl_to_diffusers_tables(sd, TRANSFORMER_RENAMES, TRANSFORMER_FUSED, TRANSFORMER_HALF_SWAPPED)


def diffusers_to_bfl_transformer(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers Flux2Transformer2DModel keys -> official FLUX.2 keys, which `Flux2` loads with strict=True."""
    return diffusers_to_bfl_tables(sd, TRANSFORMER_RENAMES, TRANSFORMER_FUSED, TRANSFORMER_HALF_SWAPPED)


# FLUX.2's converters, (model, target layout) -> function, as flux_core/formats.py CONVERTERS for FLUX.1.
CONVERTERS = {
    ("transformer", "diffusers"): bfl_to_diffusers_transformer,
    ("transformer", "bfl"): diffusers_to_bfl_transformer,
    ("ae", "diffusers"): official_to_diffusers,
    ("ae", "bfl"): diffusers_to_official,
}


# diffusers config.json fields that have no Flux2Params counterpart, with the only value we support.
_FIXED_DIFFUSERS_FIELDS = {"patch_size": 1, "timestep_guidance_channels": 256, "eps": 1e-6, "out_channels": None}


def params_from_diffusers_config(config: dict) -> Flux2Params:
    """Flux2Params from a diffusers `transformer/config.json` (Flux2Transformer2DModel), defaults as diffusers'."""
    for name, value in _FIXED_DIFFUSERS_FIELDS.items():
        got = config.get(name, value)
        if got != value and not (name == "out_channels" and got == config.get("in_channels", 128)):
            raise ValueError(f"diffusers config has {name}={got!r}; this FLUX.2 transformer supports only {value!r}")
    heads = config.get("num_attention_heads", 48)
    return Flux2Params(
        in_channels=config.get("in_channels", 128),
        context_in_dim=config.get("joint_attention_dim", 15360),
        hidden_size=heads * config.get("attention_head_dim", 128),
        num_heads=heads,
        depth=config.get("num_layers", 8),
        depth_single_blocks=config.get("num_single_layers", 48),
        axes_dim=tuple(config.get("axes_dims_rope", (32, 32, 32, 32))),
        theta=config.get("rope_theta", 2000),
        mlp_ratio=config.get("mlp_ratio", 3.0),
        guidance_embed=config.get("guidance_embeds", True),
    )
