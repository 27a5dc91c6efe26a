"""The BFL <-> diffusers conversion tables (flux_core/formats.py) and the committed inventories.

References: diffusers 0.42's own converters (single_file_utils), which read official key names, and
its model classes built on the meta device with the real FLUX.1 config.
"""

import dataclasses
import re

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)

from flux_core import Flux, get_preset
from flux_core.autoencoder import AutoEncoder, AutoEncoderParams
from flux_core.formats import (
    BFL_PREFIX,
    ConversionError,
    bfl_to_diffusers_ae,
    bfl_to_diffusers_transformer,
    detect_format,
    diffusers_to_bfl_ae,
    diffusers_to_bfl_transformer,
)
from flux_core.presets import FLUX_AE
from weights_tools.diffusers_reference import diffusers_transformer
from weights_tools.verify import load_inventory


def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def meta(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def shapes_of(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def vae_config(p: AutoEncoderParams) -> dict:
    n = len(p.ch_mult)
    return dict(
        in_channels=p.in_channels,
        out_channels=p.out_ch,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[p.ch * m for m in p.ch_mult],
        layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def diffusers_vae(p: AutoEncoderParams) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(**vae_config(p))


# A full-width model with one block of each kind: diffusers' converter assumes hidden 3072.
FULL_1x1 = dataclasses.replace(get_preset("flux-dev").params, depth=1, depth_single_blocks=1)


@pytest.fixture(scope="module")
def full_1x1_state_dict():
    with torch.device("meta"):
        model = Flux(FULL_1x1)
    return random_state_dict(model, seed=0)


# ----------------------------------------------------------------------------------------------
# Round trips, bit exact


@pytest.mark.parametrize("guidance", [True, False], ids=["dev-layout", "schnell-layout"])
def test_transformer_round_trip_tiny_is_bit_exact(guidance):
    params = dataclasses.replace(get_preset("tiny").params, guidance_embed=guidance, depth=2)
    with torch.device("meta"):
        model = Flux(params)
    sd = random_state_dict(model, seed=1)
    diffusers_sd = bfl_to_diffusers_transformer(sd)
    assert shapes_of(diffusers_sd) == shapes_of(diffusers_transformer(params).state_dict())
    assert_bit_equal(diffusers_to_bfl_transformer(diffusers_sd), sd)


def test_transformer_round_trip_full_width_is_bit_exact(full_1x1_state_dict):
    sd = full_1x1_state_dict
    diffusers_sd = bfl_to_diffusers_transformer(sd)
    assert shapes_of(diffusers_sd) == shapes_of(diffusers_transformer(FULL_1x1).state_dict())
    assert_bit_equal(diffusers_to_bfl_transformer(diffusers_sd), sd)


def test_transformer_matches_diffusers_converter_bit_exact(full_1x1_state_dict):
    ours = bfl_to_diffusers_transformer(full_1x1_state_dict)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(full_1x1_state_dict))
    assert_bit_equal(ours, theirs)


def test_final_layer_halves_are_swapped(full_1x1_state_dict):
    sd = full_1x1_state_dict
    w = sd["final_layer.adaLN_modulation.1.weight"]  # rows [shift | scale]
    out = bfl_to_diffusers_transformer({k: v for k, v in sd.items() if k.startswith("final_layer.")})
    hidden = w.shape[1]
    assert torch.equal(out["norm_out.linear.weight"][:hidden], w[hidden:])  # diffusers: [scale | shift]
    assert torch.equal(out["norm_out.linear.weight"][hidden:], w[:hidden])


@pytest.mark.parametrize("ae_params", [FLUX_AE, get_preset("tiny").ae_params], ids=["flux", "tiny"])
def test_ae_round_trip_and_diffusers_converter_bit_exact(ae_params):
    with torch.device("meta"):
        ae = AutoEncoder(ae_params)
    sd = random_state_dict(ae, seed=2)
    ours = bfl_to_diffusers_ae(sd)
    assert shapes_of(ours) == shapes_of(diffusers_vae(ae_params).state_dict())
    assert_bit_equal(ours, convert_ldm_vae_checkpoint(dict(sd), vae_config(ae_params)))
    assert_bit_equal(diffusers_to_bfl_ae(ours), sd)


def test_decoder_up_blocks_are_reversed():
    sd = meta(load_inventory("ae")["tensors"])
    out = bfl_to_diffusers_ae(sd)
    # up.0 is the full-resolution level (128 channels) and becomes diffusers' last up block.
    assert out["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape == (128, 256, 1, 1)
    assert out["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in out
    assert out["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)


# ----------------------------------------------------------------------------------------------
# Prefix, partial state dicts, errors


def test_official_prefix_is_accepted():
    sd = meta(load_inventory("flux1-schnell")["tensors"])
    prefixed = {BFL_PREFIX + k: v for k, v in sd.items()}
    assert shapes_of(bfl_to_diffusers_transformer(prefixed)) == shapes_of(bfl_to_diffusers_transformer(sd))
    assert detect_format(prefixed) == ("bfl", "transformer")


def test_one_block_converts_on_its_own():
    # The streaming file converter relies on this: each block needs only its own tensors.
    inv = load_inventory("flux1-dev")["tensors"]
    block = meta({k: s for k, s in inv.items() if k.startswith("single_blocks.7.")})
    out = bfl_to_diffusers_transformer(block)
    expected = [
        f"single_transformer_blocks.7.{m}.{p}"
        for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
        for p in ("weight", "bias")
    ] + ["single_transformer_blocks.7.attn.norm_k.weight", "single_transformer_blocks.7.attn.norm_q.weight"]
    assert sorted(out) == sorted(expected)
    assert out["single_transformer_blocks.7.proj_mlp.weight"].shape == (12288, 3072)
    assert shapes_of(diffusers_to_bfl_transformer(out)) == shapes_of(block)


def test_unconverted_keys_are_listed():
    sd = meta(load_inventory("flux1-schnell")["tensors"])
    sd["lora_unet.whatever.alpha"] = torch.empty((), device="meta")
    sd["double_blocks.0.img_attn.extra"] = torch.empty(3, device="meta")
    with pytest.raises(ConversionError) as e:
        bfl_to_diffusers_transformer(sd)
    assert str(e.value).startswith(
        "cannot convert 2 key(s) of this official-layout transformer state dict: "
        "double_blocks.0.img_attn.extra, lora_unet.whatever.alpha. Is it the right model and layout?"
    )


def test_incomplete_fused_group_is_refused():
    sd = bfl_to_diffusers_transformer(meta(load_inventory("flux1-schnell")["tensors"]))
    del sd["transformer_blocks.3.attn.add_k_proj.bias"]
    with pytest.raises(
        ConversionError,
        match=re.escape(
            "transformer_blocks.3.attn.add_q_proj.bias is fused with transformer_blocks.3.attn.add_k_proj.bias"
        ),
    ):
        diffusers_to_bfl_transformer(sd)


def test_ae_keys_given_to_the_transformer_converter_fail_clearly():
    with pytest.raises(
        ConversionError, match=r"cannot convert 244 key\(s\) of this official-layout transformer"
    ):
        bfl_to_diffusers_transformer(meta(load_inventory("ae")["tensors"]))


def test_detect_format():
    assert detect_format(load_inventory("flux1-dev")["tensors"]) == ("bfl", "transformer")
    assert detect_format(load_inventory("ae")["tensors"]) == ("bfl", "ae")
    assert detect_format(bfl_to_diffusers_ae(meta(load_inventory("ae")["tensors"]))) == ("diffusers", "ae")
    assert detect_format(["text_model.embeddings.token_embedding.weight"]) is None


# ----------------------------------------------------------------------------------------------
# Inventories of the official files


@pytest.mark.parametrize(
    "name, count, dtype", [("flux1-dev", 780, "BF16"), ("flux1-schnell", 776, "BF16"), ("ae", 244, "F32")]
)
def test_inventory_counts(name, count, dtype):
    inv = load_inventory(name)
    assert len(inv["tensors"]) == inv["num_tensors"] == count
    assert inv["dtype"] == dtype
    assert inv["num_params"] == sum(torch.Size(s).numel() for s in inv["tensors"].values())


@pytest.mark.parametrize("preset, name", [("flux-dev", "flux1-dev"), ("flux-schnell", "flux1-schnell")])
def test_meta_model_equals_transformer_inventory(preset, name):
    with torch.device("meta"):
        model = Flux(get_preset(preset).params)
    inv = {k: tuple(s) for k, s in load_inventory(name)["tensors"].items()}
    assert shapes_of(model.state_dict()) == inv


def test_meta_autoencoder_equals_ae_inventory():
    with torch.device("meta"):
        ae = AutoEncoder(FLUX_AE)
    inv = {k: tuple(s) for k, s in load_inventory("ae")["tensors"].items()}
    assert shapes_of(ae.state_dict()) == inv


@pytest.mark.parametrize("preset, name", [("flux-dev", "flux1-dev"), ("flux-schnell", "flux1-schnell")])
def test_transformer_inventory_through_diffusers_converter(preset, name):
    checkpoint = meta(load_inventory(name)["tensors"])
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}, f"keys diffusers' converter did not consume: {sorted(checkpoint)[:5]}"
    expected = shapes_of(diffusers_transformer(get_preset(preset).params).state_dict())
    assert shapes_of(converted) == expected
    # and ours agrees on the same input
    assert shapes_of(bfl_to_diffusers_transformer(meta(load_inventory(name)["tensors"]))) == expected


def test_ae_inventory_through_diffusers_converter():
    tensors = load_inventory("ae")["tensors"]
    converted = convert_ldm_vae_checkpoint(meta(tensors), vae_config(FLUX_AE))
    expected = shapes_of(diffusers_vae(FLUX_AE).state_dict())
    assert shapes_of(converted) == expected
    # The converter copies by renaming, each input key to at most one output key; so 244 distinct
    # outputs from 244 inputs means every inventory key was used, none left over.
    assert len(converted) == len(tensors) == 244
    assert shapes_of(bfl_to_diffusers_ae(meta(tensors))) == expected
