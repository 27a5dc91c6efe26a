"""FLUX.2 transformer: parity with diffusers' Flux2Transformer2DModel, the official key set, the edit seam
and the diffusers <-> official rename.

diffusers is the reference: its own converter (`convert_flux2_transformer_checkpoint_to_diffusers`)
maps the same official-layout state dict into its module tree. Unlike FLUX.1's converter it does not
assume the full width, so the models here are tiny (hidden 64, 2 heads, 2 + 2 blocks), float32.
"""

import json

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file
from tiny import TINY_FLUX2, random_state_dict, tiny_flux2
from tiny import tiny_flux2_inputs as tiny_inputs
from tiny import tiny_inputs as flux1_inputs
from tiny import tiny_model as flux1_model

from flux_core.flux2.formats import (
    bfl_to_diffusers_transformer,
    diffusers_to_bfl_transformer,
    params_from_diffusers_config,
)
from flux_core.flux2.model import SIZES, Flux2, Flux2Params, get_params
from flux_core.math import joint_attention
from flux_core.recorder import Recorder
from flux_core.seam import ModVectors

TINY = TINY_FLUX2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def diffusers_reference(p: Flux2Params) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        mlp_ratio=p.mlp_ratio, axes_dims_rope=tuple(p.axes_dim), rope_theta=p.theta, guidance_embeds=p.guidance_embed,
    )  # fmt: skip


def tiny_model(guidance_embed: bool = True, seed: int = 0) -> tuple[Flux2, dict[str, torch.Tensor]]:
    model = tiny_flux2(guidance_embed, seed)
    return model, random_state_dict(model, seed)  # the state dict it was loaded with



# ---------------------------------------------------------------------------------------------------
# (1) parity with diffusers


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev-like", "klein-like"])
def test_matches_diffusers(guidance_embed):
    ours, sd = tiny_model(guidance_embed)
    ref = diffusers_reference(ours.params)
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(sd)), strict=True)
    ref.eval()
    inp = tiny_inputs(ours.params, guidance=guidance_embed)
    with torch.inference_mode():
        out = ours(**inp)
        expected = ref(
            hidden_states=inp["img"], encoder_hidden_states=inp["txt"], timestep=inp["timesteps"],
            img_ids=inp["img_ids"][0], txt_ids=inp["txt_ids"][0], guidance=inp["guidance"], return_dict=False,
        )[0]  # fmt: skip
    assert out.shape == (2, 12, ours.params.in_channels)
    err = rel_err(out, expected)
    print(f"FLUX.2 parity vs diffusers (guidance_embed={guidance_embed}): relative error {err:.3e}")
    assert err <= 1e-5, f"relative error {err:.2e} vs diffusers"
    # The comparison is sensitive: a perturbed weight must break it.
    with torch.no_grad():
        ours.single_blocks[1].linear2.weight[0, 0] += 0.5
        assert rel_err(ours(**inp), expected) > 1e-4


def test_guidance_is_required_only_where_embedded():
    ours, _ = tiny_model(guidance_embed=True)
    with pytest.raises(ValueError, match="this FLUX.2 model embeds guidance"):
        ours(**tiny_inputs(ours.params, guidance=False))
    klein, _ = tiny_model(guidance_embed=False)
    inp = tiny_inputs(klein.params)
    with torch.inference_mode():  # diffusers ignores guidance without a guidance embedder; so do we
        assert torch.equal(klein(**inp), klein(**{**inp, "guidance": None}))


def test_three_axis_ids_are_refused():
    ours, _ = tiny_model()
    inp = tiny_inputs(ours.params)
    with pytest.raises(ValueError, match="FLUX.2 position ids have 4 axes"):
        ours(**{**inp, "img_ids": inp["img_ids"][..., :3]})


# ---------------------------------------------------------------------------------------------------
# (2) the official key set


def official_shapes(p: Flux2Params) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of `Flux2(params).state_dict()` in black-forest-labs/flux2 src/flux2/model.py,
    written out from its constructors (every Linear there has bias=False; the mlp width is doubled
    for SwiGLU, `mlp_mult_factor = 2`)."""
    C, D, M = p.hidden_size, p.head_dim, int(p.hidden_size * p.mlp_ratio)
    keys = {
        "img_in.weight": (C, p.in_channels),
        "time_in.in_layer.weight": (C, 256),
        "time_in.out_layer.weight": (C, C),
        "txt_in.weight": (C, p.context_in_dim),
        "double_stream_modulation_img.lin.weight": (6 * C, C),
        "double_stream_modulation_txt.lin.weight": (6 * C, C),
        "single_stream_modulation.lin.weight": (3 * C, C),
        "final_layer.linear.weight": (p.in_channels, C),
        "final_layer.adaLN_modulation.1.weight": (2 * C, C),
    }
    if p.guidance_embed:
        keys |= {"guidance_in.in_layer.weight": (C, 256), "guidance_in.out_layer.weight": (C, C)}
    for i in range(p.depth):
        for s in ("img", "txt"):
            keys |= {
                f"double_blocks.{i}.{s}_attn.qkv.weight": (3 * C, C),
                f"double_blocks.{i}.{s}_attn.norm.query_norm.scale": (D,),
                f"double_blocks.{i}.{s}_attn.norm.key_norm.scale": (D,),
                f"double_blocks.{i}.{s}_attn.proj.weight": (C, C),
                f"double_blocks.{i}.{s}_mlp.0.weight": (2 * M, C),
                f"double_blocks.{i}.{s}_mlp.2.weight": (C, M),
            }
    for i in range(p.depth_single_blocks):
        keys |= {
            f"single_blocks.{i}.linear1.weight": (3 * C + 2 * M, C),
            f"single_blocks.{i}.linear2.weight": (C, C + M),
            f"single_blocks.{i}.norm.query_norm.scale": (D,),
            f"single_blocks.{i}.norm.key_norm.scale": (D,),
        }
    return keys


@pytest.mark.parametrize("name", [*SIZES, "tiny"])
def test_state_dict_is_the_official_key_set(name):
    params = TINY if name == "tiny" else get_params(name)
    with torch.device("meta"):
        model = Flux2(params)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes(params)
    sd = {k: torch.zeros(s, device="meta") for k, s in official_shapes(params).items()}
    model.load_state_dict(sd, strict=True, assign=True)


def test_preset_sizes():
    # FLUX.2 [dev] is a 32B transformer; klein 4B / 9B as named (the 4B / 9B count is the transformer).
    counts = {}
    for name, params in SIZES.items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in Flux2(params).parameters())
    assert counts == {"flux2-dev": 32_223_281_152, "flux2-klein-4b": 3_875_544_576, "flux2-klein-9b": 9_078_581_248}
    with pytest.raises(KeyError, match="unknown FLUX.2 size 'flux2-pro'; valid: flux2-dev, flux2-klein-4b"):
        get_params("flux2-pro")


# ---------------------------------------------------------------------------------------------------
# (3) the edit seam


class Identity:
    """An edit that recomputes the attention outputs from the site's q, k, v itself."""

    def __init__(self):
        self.y = "unset"
        self.checked = 0

    def vectors(self, model, vec, timesteps, y, guidance):
        self.y = y
        return ModVectors(img=vec, txt=vec, out=vec)

    def double_block(self, site):
        blk, T = site.block, site.n_txt
        attn = joint_attention(site.q, site.k, site.v)  # (B, T+N, C)
        # The site's modulation layer is the one the block was modulated by, and the text queries are
        # what the block's own weights give for the modulated text (before RoPE: compare v, unrotated).
        mod1, _ = site.txt_modulation(site.vecs.txt)
        assert torch.equal(mod1.shift, site.txt_mod.shift) and torch.equal(mod1.gate, site.txt_mod.gate)
        _, _, txt_v = blk.txt_attn.qkv_heads(mod1.modulate(blk.txt_norm1(site.txt)))
        assert torch.equal(txt_v, site.v[:, :, :T])
        self.checked += 1
        return blk.img_attn.proj(attn[:, T:]), blk.txt_attn.proj(attn[:, :T])

    def single_block(self, site):
        return joint_attention(site.q, site.k, site.v)


def test_seam_identity_and_recorder_are_bit_identical():
    model, _ = tiny_model()
    inp = tiny_inputs(model.params)
    with torch.inference_mode():
        plain = model(**inp)
        assert torch.equal(plain, model(**inp, edit=None))
        identity = Identity()
        assert torch.equal(plain, model(**inp, edit=identity))
        rec = Recorder(keep=("img_attn_out", "q", "attn", "mlp"), attention_maps=True)
        assert torch.equal(plain, model(**inp, edit=rec))
    assert identity.y is None and identity.checked == model.params.depth  # no pooled text in FLUX.2
    assert [(e.kind, e.index) for e in rec.entries] == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    B, N, T, C = 2, 12, 5, model.params.hidden_size
    assert rec.entries[0].tensors["img_attn_out"].shape == (B, N, C)
    assert rec.entries[0].tensors["q"].shape == (B, model.params.num_heads, T + N, model.params.head_dim)
    assert rec.entries[2].tensors["mlp"].shape == (B, T + N, 2 * int(C * model.params.mlp_ratio))  # SwiGLU input
    torch.testing.assert_close(rec.entries[2].tensors["attention_map"].sum(-1), torch.ones(B, T + N))


class ZeroImageAttention:
    def vectors(self, model, vec, timesteps, y, guidance):
        return ModVectors(img=vec, txt=vec, out=vec)

    def double_block(self, site):
        img_out, txt_out = site.outputs()
        return (torch.zeros_like(img_out) if site.index == 0 else img_out), txt_out

    def single_block(self, site):
        return site.attention()


class OtherVectors(ZeroImageAttention):
    """A coarse-style edit: another text-stream modulation vector; the fine seam left as it is."""

    def vectors(self, model, vec, timesteps, y, guidance):
        return ModVectors(img=vec, txt=2 * vec, out=vec)

    def double_block(self, site):
        return site.outputs()


def test_edits_change_the_output():
    model, _ = tiny_model()
    inp = tiny_inputs(model.params)
    with torch.inference_mode():
        plain = model(**inp)
        assert rel_err(model(**inp, edit=ZeroImageAttention()), plain) > 1e-3
        assert rel_err(model(**inp, edit=OtherVectors()), plain) > 1e-3


def test_flux1_sites_carry_their_modulation_layers():
    # The field FLUX.2 needs (the text modulation layer lives on the model, not the block) is filled
    # by FLUX.1 blocks too, so an edit written against the site runs on both.
    model = flux1_model(depth=1, single=1)
    seen = []

    class Check(ZeroImageAttention):
        def double_block(self, site):
            mod1, _ = site.txt_modulation(site.vecs.txt)
            seen.append(site.txt_modulation is site.block.txt_mod and torch.equal(mod1.scale, site.txt_mod.scale))
            return site.outputs()

    with torch.inference_mode():
        inp = flux1_inputs(model)
        assert torch.equal(model(**inp), model(**inp, edit=Check()))
    assert seen == [True]


# ---------------------------------------------------------------------------------------------------
# (4) the diffusers <-> official rename


@pytest.mark.parametrize("guidance_embed", [True, False])
def test_rename_inverts_diffusers_converter(guidance_embed):
    _, sd = tiny_model(guidance_embed)
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(sd))
    back = diffusers_to_bfl_transformer(theirs)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    ours = bfl_to_diffusers_transformer({"model.diffusion_model." + k: v for k, v in sd.items()})
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_diffusers_folder_loads_one_to_one(tmp_path):
    model, sd = tiny_model(guidance_embed=False)
    ref = diffusers_reference(model.params)
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(sd)), strict=True)
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    params = params_from_diffusers_config(config)
    assert params == model.params
    loaded = Flux2(params)
    files = sorted((tmp_path / "transformer").glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(f).items()}
    loaded.load_state_dict(diffusers_to_bfl_transformer(state), strict=True)
    inp = tiny_inputs(params, guidance=False)
    with torch.inference_mode():
        assert torch.equal(loaded.eval()(**inp), model(**inp))


# ---------------------------------------------------------------------------------------------------
# The official code itself, where a mirror of black-forest-labs/flux2 is at hand (skipped elsewhere)

OFFICIAL_MIRROR = "/work/.mirror/black-forest-labs+flux2/repo"


def official_module():
    """src/flux2/model.py of the mirror (no work tree: read with git show), as a module."""
    import subprocess
    import types

    try:
        source = subprocess.run(
            ["git", "-C", OFFICIAL_MIRROR, "show", "HEAD:src/flux2/model.py"], capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no mirror of black-forest-labs/flux2 here")
    module = types.ModuleType("official_flux2_model")
    exec(compile(source, "flux2/model.py", "exec"), module.__dict__)
    return module


def test_matches_the_official_code():
    official = official_module()
    ours, sd = tiny_model(guidance_embed=True)  # the official snapshot always embeds guidance
    p = ours.params
    ref = official.Flux2(
        official.Flux2Params(
            in_channels=p.in_channels, context_in_dim=p.context_in_dim, hidden_size=p.hidden_size,
            num_heads=p.num_heads, depth=p.depth, depth_single_blocks=p.depth_single_blocks,
            axes_dim=list(p.axes_dim), theta=p.theta, mlp_ratio=p.mlp_ratio,
        )
    )  # fmt: skip
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    ref.load_state_dict(sd, strict=True)
    inp = tiny_inputs(p)
    with torch.inference_mode():
        out = ours(**inp)
        expected = ref.eval()(
            inp["img"], inp["img_ids"], inp["timesteps"], inp["txt"], inp["txt_ids"], inp["guidance"]
        )
    # The official rope computes its angles in the ids' dtype (float32 here), ours in float64.
    err = rel_err(out, expected)
    print(f"FLUX.2 parity vs the official code: relative error {err:.3e}")
    assert err <= 1e-5


# ---------------------------------------------------------------------------------------------------
# The FluxSpace edit, written for FLUX.1's double blocks, on FLUX.2's


def test_fluxspace_fine_edit_runs_on_flux2():
    from fluxspace.spec import Concept, EditSpec, EncodedEdit
    from fluxspace.step import FluxSpaceEdit

    model, _ = tiny_model()
    inp = tiny_inputs(model.params)
    g = torch.Generator().manual_seed(3)
    enc = EncodedEdit(torch.randn(2, 5, model.params.context_in_dim, generator=g), None, [[1, 2]])  # prior, concept

    def fine(lam):
        return EditSpec(concepts=(Concept("x", lambda_fine=lam, tau_m=0.3),), lambda_coarse=0.0)

    with torch.inference_mode():
        plain = model(**inp)
        assert torch.equal(model(**inp, edit=FluxSpaceEdit(fine(0.0), enc)), plain)
        assert rel_err(model(**inp, edit=FluxSpaceEdit(fine(3.0), enc)), plain) > 1e-2
        coarse = EditSpec(concepts=(Concept("x", lambda_fine=0.0),), lambda_coarse=0.5)
        with pytest.raises(ValueError, match="this model has none"):
            model(**inp, edit=FluxSpaceEdit(coarse, EncodedEdit(enc.branch_txt, torch.zeros(1, 8), [[1]])))
