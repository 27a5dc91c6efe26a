"""LoRA (flux_core/lora): every format against diffusers' own LoRA loading (or the LoRA formula by
hand where diffusers cannot load it), fused == unfused, bit-exact undo and strength 0, and every
refusal with its reason.

The parity model is FLUX.1-dev with one block of each kind at a quarter of its width (heads of the
official 128 dims); kohya's single_blocks.linear1 is also checked at full width, since diffusers'
kohya converter hard-codes the 3072-wide split of that fused layer."""

import copy
import dataclasses

import pytest
import torch
from lora_files import (
    adapter_outputs,
    bfl_file,
    diffusers_file,
    in_blocks,
    kohya_file,
    linear_names,
    random_pairs,
    run_ours,
    write,
    xlabs_file,
)
from test_model import build_pair, random_state_dict, rel_err

from flux_core import Flux, get_preset
from flux_core.formats import bfl_to_diffusers_transformer
from flux_core.lora import (
    LoraError,
    LoraLinear,
    LoraScales,
    attach,
    detach,
    fuse,
    linear_shapes,
    read_lora,
    updates_for,
)
from flux_core.runtime.fp8 import quantize_linears
from flux_core.sampling import img_ids as make_img_ids
from flux_core.sampling import txt_ids as make_txt_ids
from weights_tools.diffusers_reference import diffusers_transformer

RANK = 4


def narrow_pair(seed: int):
    """FLUX.1-dev's structure at 768 wide (6 heads of 128), one double and one single block."""
    params = dataclasses.replace(get_preset("flux-dev").params, hidden_size=768, num_heads=6, context_in_dim=256,
                                 vec_in_dim=128, depth=1, depth_single_blocks=1)  # fmt: skip
    with torch.device("meta"):
        ours = Flux(params)
    ref = diffusers_transformer(params)
    sd = random_state_dict(ours, seed)
    ours.load_state_dict(sd, strict=True, assign=True)
    # our converter (tests/test_formats.py checks it against diffusers'; that one hard-codes width 3072)
    ref.load_state_dict(bfl_to_diffusers_transformer(dict(sd)), strict=True, assign=True)
    return ours.eval(), ref.eval()


def with_inputs(ours, ref):
    p = ours.params
    g = torch.Generator().manual_seed(2)
    B, h, w, T = 1, 3, 4, 5
    inputs = dict(
        img=torch.randn(B, h * w, p.in_channels, generator=g),
        txt=torch.randn(B, T, p.context_in_dim, generator=g),
        y=torch.randn(B, p.vec_in_dim, generator=g),
        timesteps=torch.tensor([0.6]),
        guidance=torch.tensor([3.5]),
        img_ids=make_img_ids(B, 16 * h, 16 * w),
        txt_ids=make_txt_ids(B, T),
    )
    # diffusers' own Linear names, read before PEFT wraps any of them (base_layer, lora_A, ...)
    ref.lora_free_names = linear_names(ref)
    return ours, ref, inputs


@pytest.fixture(scope="module")
def pair():
    return with_inputs(*narrow_pair(seed=3))


def run_ref(ref, x):
    with torch.inference_mode():
        return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                   timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                   guidance=x["guidance"], return_dict=False)[0]  # fmt: skip


def diffusers_outputs(ref, sd, x, scales):
    """diffusers' forward with the LoRA in `sd` loaded its own way, at each strength."""
    from diffusers import FluxPipeline

    state, alphas = FluxPipeline.lora_state_dict(copy.deepcopy(sd), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=ref, adapter_name="t")
    return adapter_outputs(ref, run_ref, x, scales)


def ours_outputs(model, path, x, scales):
    """Our forward, fused and unfused, at each strength; the model is left as it was."""
    lora = read_lora(path)
    updates = updates_for(lora, "flow", linear_shapes(model))
    fused = []
    for s in scales:
        handle = fuse(model, updates, s)
        fused.append(run_ours(model, x))
        handle.undo()
    scales_of = LoraScales(t=0.0)
    attach(model, "t", updates, scales_of)
    unfused = []
    for s in scales:
        scales_of["t"] = s
        unfused.append(run_ours(model, x))
    detach(model)
    return fused, unfused


def dense(model, keep, seed):
    names = getattr(model, "lora_free_names", None) or linear_names(model)
    return random_pairs({n: s for n, s in names.items() if keep(n)}, RANK, seed)


# ----------------------------------------------------------------------------------------------
# Formats against diffusers


def _cases(ours, ref):
    diffusers_all = dense(ref, lambda n: True, 1)
    blocks_official = dense(ours, in_blocks, 2)
    attention = ("attn.to_", "attn.add_", "to_out", "to_add_out")
    mixture = dense(ref, lambda n: any(a in n for a in attention) or not in_blocks(n), 3)
    # sd-scripts' split_qkv form: one down per q / k / v stacked (3r rows), a block-diagonal up
    g = torch.Generator().manual_seed(4)
    hidden = ours.params.hidden_size
    downs = [torch.randn(RANK, hidden, generator=g) * 0.05 for _ in range(3)]
    up = torch.block_diag(*[torch.randn(hidden, RANK, generator=g) * 0.05 for _ in range(3)])
    split = {"double_blocks.0.img_attn.qkv": (torch.cat(downs), up)}
    return {
        "diffusers": diffusers_file(diffusers_all),
        "diffusers+alpha": diffusers_file(diffusers_all, alpha=2.0),
        "kohya": kohya_file(blocks_official, "lora_unet_", alpha=2.0),
        "kohya-split-qkv": kohya_file(split, "lora_unet_", alpha=6.0),
        "kohya-diffusers-names": kohya_file(mixture, "lora_transformer_", alpha=8.0),
        "xlabs": xlabs_file(ours, RANK, 5),
    }


CASES = ("diffusers", "diffusers+alpha", "kohya", "kohya-split-qkv", "kohya-diffusers-names", "xlabs")


def check_against_diffusers(ours, ref, x, sd, tmp_path):
    plain = run_ours(ours, x)
    expected = diffusers_outputs(ref, sd, x, (0.5, 1.0))
    fused, unfused = ours_outputs(ours, write(tmp_path, sd), x, (0.5, 1.0))
    for s, want, a, b in zip((0.5, 1.0), expected, fused, unfused, strict=True):
        assert rel_err(want, plain) > 1e-3, f"the LoRA barely changes the output at {s}: the check could not fail"
        assert rel_err(a, want) <= 1e-5, f"fused at {s}: {rel_err(a, want):.2e} vs diffusers"
        assert rel_err(b, want) <= 1e-5, f"unfused at {s}: {rel_err(b, want):.2e} vs diffusers"
    assert torch.equal(run_ours(ours, x), plain), "undo / detach must leave the model as it was"


@pytest.mark.parametrize("case", CASES)
def test_lora_matches_diffusers(pair, tmp_path, case):
    ours, ref, x = pair
    sd = _cases(ours, ref)[case]
    if case == "kohya":  # single_blocks.linear1 apart: diffusers splits it only at full width (below)
        sd = {k: v for k, v in sd.items() if "linear1" not in k}
    check_against_diffusers(ours, ref, x, sd, tmp_path)


def test_kohya_fused_single_block_linear1_matches_diffusers_at_full_width(tmp_path):
    torch.manual_seed(0)
    ours, ref, x = with_inputs(*build_pair("dev", seed=4))
    pairs = random_pairs(linear_names(ours, lambda n: n == "single_blocks.0.linear1"), RANK, 10)
    check_against_diffusers(ours, ref, x, kohya_file(pairs, "lora_unet_", 2.0), tmp_path)


def test_variants_of_the_diffusers_form_read_the_same(pair, tmp_path):
    """`.default` (PEFT's own save), no prefix and `base_model.model.` are the same LoRA (diffusers
    drops or misreads these, so they are checked against the plain form)."""
    ours, ref, _ = pair
    pairs = dense(ref, in_blocks, 6)
    want = updates_for(read_lora(write(tmp_path, diffusers_file(pairs), "a.safetensors")), "flow", linear_shapes(ours))
    for i, variant in enumerate((diffusers_file(pairs, default=True), diffusers_file(pairs, prefix=""),
                                 diffusers_file(pairs, prefix="base_model.model."))):  # fmt: skip
        got = updates_for(read_lora(write(tmp_path, variant, f"v{i}.safetensors")), "flow", linear_shapes(ours))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k].down, want[k].down) and torch.equal(got[k].up, want[k].up)


# ----------------------------------------------------------------------------------------------
# Formats diffusers cannot load (or loads wrongly): the formula by hand


def by_hand(model, deltas: dict[str, tuple[torch.Tensor, torch.Tensor | None]], s: float):
    """A copy of `model` with W += s * delta (and b += s * bias) for each named Linear."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, (delta, bias) in deltas.items():
            m = out.get_submodule(name)
            m.weight += s * delta
            if bias is not None:
                m.bias += s * bias
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_official_form_with_biases_is_the_formula(pair, tmp_path, prefix):
    """The official LinearLora (flux src/flux/modules/lora.py): out + s * (B(A x) + b), no alpha."""
    ours, _, x = pair
    pairs = dense(ours, lambda n: True, 7)
    g = torch.Generator().manual_seed(8)
    biases = {n: torch.randn(up.shape[0], generator=g) * 0.05 for n, (_, up) in pairs.items()}
    path = write(tmp_path, bfl_file(pairs, biases, prefix))
    assert read_lora(path).format == "bfl"
    deltas = {n: (up @ down, biases[n]) for n, (down, up) in pairs.items()}
    for s in (0.5, 1.0):
        want = run_ours(by_hand(ours, deltas, s), x)
        fused, unfused = ours_outputs(ours, path, x, (s,))
        assert rel_err(fused[0], want) <= 1e-5 and rel_err(unfused[0], want) <= 1e-5


def test_kohya_outside_the_blocks_is_the_formula(pair, tmp_path):
    """diffusers converts kohya's img_in ... final_layer entries and then drops them: ours applies them."""
    ours, _, x = pair
    pairs = dense(ours, lambda n: not in_blocks(n), 9)
    assert "final_layer.adaLN_modulation.1" in pairs and "img_in" in pairs
    path = write(tmp_path, kohya_file(pairs, "lora_unet_", alpha=1.0))
    deltas = {n: (up @ down / RANK, None) for n, (down, up) in pairs.items()}
    want = run_ours(by_hand(ours, deltas, 0.7), x)
    fused, unfused = ours_outputs(ours, path, x, (0.7,))
    assert rel_err(fused[0], want) <= 1e-5 and rel_err(unfused[0], want) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Fused, unfused, undo, strength 0, several LoRAs, fp8


@pytest.fixture
def tiny():
    from tiny import tiny_inputs, tiny_model

    model = tiny_model()
    return model, tiny_inputs(model)


def tiny_lora(tmp_path, model, seed, name):
    pairs = random_pairs(linear_names(model), RANK, seed, std=0.2)
    return read_lora(write(tmp_path, kohya_file(pairs, "lora_unet_", alpha=3.0), name))


def test_undo_and_strength_zero_are_bit_exact(tmp_path, tiny):
    model, x = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run_ours(model, x)
    updates = updates_for(tiny_lora(tmp_path, model, 1, "a.safetensors"), "flow", linear_shapes(model))
    handle = fuse(model, updates, 0.8)
    assert not torch.equal(run_ours(model, x), plain)
    handle.undo()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(run_ours(model, x), plain)
    fuse(model, updates, 0.0).undo()
    assert torch.equal(run_ours(model, x), plain)
    handle = fuse(model, updates, 0.0)
    assert torch.equal(run_ours(model, x), plain), "fused at strength 0 is the plain model"
    handle.undo()
    scales = LoraScales(a=0.0)
    attach(model, "a", updates, scales)
    assert torch.equal(run_ours(model, x), plain), "unfused at strength 0 is the plain model"
    detach(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_several_loras_unfused_equal_both_fused(tmp_path, tiny):
    model, x = tiny
    a = updates_for(tiny_lora(tmp_path, model, 1, "a.safetensors"), "flow", linear_shapes(model))
    b = updates_for(tiny_lora(tmp_path, model, 2, "b.safetensors"), "flow", linear_shapes(model))
    fa, fb = fuse(model, a, 0.6), fuse(model, b, -0.4)
    want = run_ours(model, x)
    fb.undo()
    fa.undo()
    scales = LoraScales(a=0.6, b=-0.4)
    attach(model, "a", a, scales)
    attach(model, "b", b, scales)
    assert rel_err(run_ours(model, x), want) <= 1e-5
    scales["b"] = 0.0  # a strength changes without reloading
    only_a = run_ours(model, x)
    detach(model)
    fa = fuse(model, a, 0.6)
    assert rel_err(only_a, run_ours(model, x)) <= 1e-5
    fa.undo()


def test_fp8_weights_take_loras_fused_and_unfused(tmp_path, tiny):
    model, x = tiny
    updates = updates_for(tiny_lora(tmp_path, model, 1, "a.safetensors"), "flow", linear_shapes(model))
    full = copy.deepcopy(model)
    fuse(full, updates, 1.0)
    want = run_ours(full, x)
    quantize_linears(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = fuse(model, updates, 1.0)
    fused = run_ours(model, x)
    handle.undo()
    assert all(torch.equal(before[k].view(torch.uint8) if before[k].dtype.itemsize == 1 else before[k],
                           v.view(torch.uint8) if v.dtype.itemsize == 1 else v)
               for k, v in model.state_dict().items()), "undo restores the fp8 weights and scales"  # fmt: skip
    attach(model, "a", updates, LoraScales(a=1.0))
    unfused = run_ours(model, x)
    # fp8 rounds each weight to 3 mantissa bits: the fp8 model is within its usual error of the full one.
    assert rel_err(fused, want) < 0.05 and rel_err(unfused, want) < 0.05


# ----------------------------------------------------------------------------------------------
# Refusals


def refused(tmp_path, sd, model, match, metadata=None):
    path = write(tmp_path, sd, metadata=metadata)
    with pytest.raises(LoraError, match=match):
        updates_for(read_lora(path), "flow", linear_shapes(model))


def test_refusals(tmp_path, tiny):
    model, _ = tiny
    pairs = random_pairs(linear_names(model, in_blocks), RANK, 1)
    good = kohya_file(pairs, "lora_unet_", 2.0)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    refused(tmp_path, {k: v for k, v in model.state_dict().items()}, model, r"not a LoRA file: no key has a LoRA suffix")
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}  # fmt: skip
    refused(tmp_path, sdxl, model, r"kohya LoRA for modules FLUX.1 does not have \(these are Stable Diffusion")
    sd3 = diffusers_file({"transformer_blocks.0.attn2.to_q": (torch.zeros(4, 8), torch.zeros(8, 4))})
    refused(tmp_path, sd3, model, r"does not have \(these are Stable Diffusion 3.5")
    refused(tmp_path, {**good, f"{key}.lora_up.weight": torch.zeros(good[f"{key}.lora_up.weight"].shape[0], RANK + 1)},
            model, r"rank mismatch: down lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight has rank 4")
    far = kohya_file({"double_blocks.7.img_attn.qkv": pairs["double_blocks.0.img_attn.qkv"]}, "lora_unet_", 2.0)
    refused(tmp_path, far, model, r"updates double_blocks.7.img_attn.qkv, which this model does not have")
    wide = kohya_file({"double_blocks.0.img_attn.qkv": (torch.zeros(RANK, 99), torch.zeros(3 * 32, RANK))}, "lora_unet_", 1.0)
    refused(tmp_path, wide, model, r"takes 99 input features; double_blocks.0.img_attn.qkv of this model takes")
    refused(tmp_path, {k: v for k, v in good.items() if k != f"{key}.alpha"}, model,
            rf"kohya LoRA entries without .alpha: {key}")
    for bad in (float("nan"), float("inf")):
        t = good[f"{key}.lora_down.weight"].clone()
        t[0, 0] = bad
        refused(tmp_path, {**good, f"{key}.lora_down.weight": t}, model, rf"{key}.lora_down.weight holds NaN or inf")
    refused(tmp_path, {**good, "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16)}, model,
            r"1 key\(s\) of this kohya LoRA are no LoRA tensor and would be left unused: "
            r"double_blocks.0.img_attn.norm.query_norm.scale")
    refused(tmp_path, {**good, f"{key}.dora_scale": torch.ones(1, 32)}, model, r"DoRA magnitude tensors")
    refused(tmp_path, {**good, f"{key}.alpha": torch.tensor([1.0, 2.0])}, model, r"an alpha is one number")
    refused(tmp_path, diffusers_file(random_pairs({"transformer_blocks.0.attn.to_q": (32, 32)}, RANK, 1)),
            model, r"alpha_pattern", metadata={"lora_adapter_metadata": '{"alpha_pattern": {"x": 1}}'})


def test_flux_weights_inspect_describes_a_lora(tmp_path, tiny, capsys):
    from weights_tools.cli import main as weights_main
    from weights_tools.inspect import inspect_path

    model, _ = tiny
    pairs = random_pairs(linear_names(model, in_blocks), RANK, 1)
    sd = kohya_file(pairs, "lora_unet_", 2.0) | diffusers_file({}, prefix="")  # kohya, every block Linear
    (report,) = inspect_path(write(tmp_path, sd))
    assert (report["format"], report["ranks"], report["alphas"], report["strengths"]) == ("kohya", [4], [2.0], [0.5])
    assert report["entries"] == len(pairs) and report["problem"] is None
    assert "double_blocks.{0..1}.img_attn.qkv" in report["targets"]["flow"]
    assert "single_blocks.{0..1}.linear1" in report["targets"]["flow"]
    bad = {k: v for k, v in sd.items() if not k.endswith("img_attn_qkv.alpha")}
    assert weights_main(["inspect", str(write(tmp_path, bad, "bad.safetensors"))]) == 0
    out = capsys.readouterr().out
    assert "LoRA      kohya format" in out
    assert "problem   " + str(tmp_path / "bad.safetensors") + ": kohya LoRA entries without .alpha: " in out


def test_module_names_of_every_format_resolve_to_the_official_module():
    """One key per naming form, including those diffusers misreads (kohya-style proj_mlp) and the text
    encoders' (CLIP with or without transformers 4's `text_model.`)."""
    from flux_core.lora.formats import Rows, Target, detect, parse

    cases = {
        "lora_transformer_single_transformer_blocks_3_proj_mlp.lora_down.weight":
            Target("flow", "single_blocks.3.linear1", Rows((3,), 4)),
        "lora_transformer_norm_out_linear.lora_down.weight": Target("flow", "final_layer.adaLN_modulation.1", Rows((0, 1), 2, True)),
        "lora_unet_double_blocks_12_txt_mod_lin.lora_down.weight": Target("flow", "double_blocks.12.txt_mod.lin"),
        "lora_te1_text_model_encoder_layers_5_mlp_fc2.lora_down.weight": Target("clip", "encoder.layers.5.mlp.fc2"),
        "lora_te1_encoder_layers_5_self_attn_out_proj.lora_down.weight": Target("clip", "encoder.layers.5.self_attn.out_proj"),
        "lora_te3_encoder_block_2_layer_1_DenseReluDense_wi_1.lora_down.weight":
            Target("t5", "encoder.block.2.layer.1.DenseReluDense.wi_1"),
        "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": Target("flow", "single_blocks.0.linear1", Rows((1,), 4)),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": Target("clip", "encoder.layers.0.self_attn.q_proj"),
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.o.lora_A.weight": Target("t5", "encoder.block.0.layer.0.SelfAttention.o"),
        "double_blocks.4.processor.proj_lora2.down.weight": Target("flow", "double_blocks.4.txt_attn.proj"),
        "single_blocks.1.processor.qkv_lora.down.weight": Target("flow", "single_blocks.1.linear1", Rows((0, 1, 2), 4)),
        "model.diffusion_model.guidance_in.out_layer.lora_A.weight": Target("flow", "guidance_in.out_layer"),
    }  # fmt: skip
    for key, target in cases.items():
        fmt = detect([key])
        (entry,), left = parse([key], fmt)
        assert (entry.target, left) == (target, []), key
