"""LoRA files on FLUX.2 (flux_core/lora with family="flux2"): the diffusers/PEFT and kohya forms against
diffusers' own LoRA loading on Flux2Transformer2DModel (through peft), the official form against the
formula by hand, fused == unfused, bit-exact undo and strength 0 (also with fp8 weights), and the
FLUX.2 refusals in one line.

The model is tests/tiny.py's tiny random FLUX.2 (hidden 64, 2 + 2 blocks, float32); diffusers gets
the same weights through its own converter, as in tests/test_flux2_model.py.
"""

import copy
import re

import pytest
import torch
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
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
from test_flux2_model import diffusers_reference, rel_err
from tiny import random_state_dict, tiny_flux2, tiny_flux2_inputs, tiny_model

from flux_core.lora import (
    LoraError,
    LoraScales,
    attach,
    detach,
    family_of,
    fuse,
    linear_shapes,
    read_lora,
    updates_for,
)
from flux_core.lora.formats import FLUX2_LINEARS
from flux_core.runtime.fp8 import quantize_linears
from fluxspace.models import FLUX_MINI_DIR

RANK = 4
SCALES = (0.5, 1.0)


@pytest.fixture(scope="module")
def pair():
    ours = tiny_flux2(seed=3)
    ref = diffusers_reference(ours.params)
    sd = convert_flux2_transformer_checkpoint_to_diffusers(random_state_dict(ours, 3))
    ref.load_state_dict(sd, strict=True)
    ref.eval()
    ref.lora_free_names = linear_names(ref)  # diffusers' own Linear names, before peft wraps them
    return ours, ref, tiny_flux2_inputs(ours.params, B=1)


def run_ref(ref, x):
    with torch.inference_mode():
        return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                   img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"], return_dict=False)[0]  # fmt: skip


def diffusers_outputs(ref, sd, x):
    """diffusers' forward with the LoRA loaded its own way (Flux2LoraLoaderMixin.lora_state_dict converts
    kohya and ai-toolkit files; load_lora_adapter puts it in through peft), at each strength."""
    state = Flux2LoraLoaderMixin.lora_state_dict(copy.deepcopy(sd))
    ref.load_lora_adapter(state, adapter_name="t")
    return adapter_outputs(ref, run_ref, x, SCALES)


def ours_outputs(model, path, x):
    """Our forward, fused and unfused, at each strength; the model is left as it was (checked bit for bit)."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run_ours(model, x)
    updates = updates_for(read_lora(path, family=family_of(model)), "flow", linear_shapes(model))
    # unfused first: fuse + undo restores the weights bit for bit but in new memory, where 2-thread GEMMs may
    # round differently, so "strength 0 == plain" is compared before any weight is replaced
    scales = LoraScales(t=0.0)
    attach(model, "t", updates, scales)
    unfused = []
    for s in (0.0, *SCALES):
        scales["t"] = s
        unfused.append(run_ours(model, x))
    detach(model)
    fused = []
    for s in (0.0, *SCALES):
        handle = fuse(model, updates, s)
        fused.append(run_ours(model, x))
        handle.undo()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "undo / detach did not restore the weights"
    assert torch.equal(fused[0], plain) and torch.equal(unfused[0], plain), (
        "strength 0 is not the plain model"
    )
    return fused[1:], unfused[1:]


def check(ours, expected):
    for got, want in zip(ours, expected, strict=True):
        err = rel_err(got, want)
        assert err <= 1e-5, f"relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("form", ["transformer.", "base_model.model.", ".default"])
def test_diffusers_form_matches_diffusers(tmp_path, pair, form):
    """Every Linear of the transformer (diffusers' names: split to_q/k/v, whole to_qkv_mlp_proj, the shared
    modulations, the swapped norm_out.linear), with diffusers' and PEFT's prefixes."""
    ours, ref, x = pair
    pairs = random_pairs(ref.lora_free_names, RANK, seed=5)
    prefix = "transformer." if form == ".default" else form
    sd = diffusers_file(pairs, prefix=prefix, default=form == ".default")
    fused, unfused = ours_outputs(ours, write(tmp_path, sd), x)
    plain = run_ref(ref, x)
    # diffusers reads its own form (transformer.<module>); the other spellings name the same tensors
    expected = diffusers_outputs(ref, diffusers_file(pairs), x)
    assert rel_err(expected[1], plain) > 1e-2, "the LoRA should change the output"
    check(fused, expected)
    check(unfused, expected)


def test_kohya_form_matches_diffusers(tmp_path, pair):
    """sd-scripts' names (official, dots as _) with alpha: the modules diffusers' FLUX.2 kohya converter maps."""
    ours, ref, x = pair
    extras = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear")
    names = linear_names(ours, lambda n: (in_blocks(n) and "modulation" not in n) or n in extras)
    sd = kohya_file(random_pairs(names, RANK, seed=6), "lora_unet_", alpha=2.0)
    fused, unfused = ours_outputs(ours, write(tmp_path, sd), x)
    expected = diffusers_outputs(ref, sd, x)
    check(fused, expected)
    check(unfused, expected)


def test_official_form_equals_the_formula(tmp_path, pair):
    """`diffusion_model.<official module>.lora_A/B.weight`: W + s * B @ A, by hand, on every Linear."""
    ours, _, x = pair
    pairs = random_pairs(linear_names(ours), RANK, seed=7)
    path = write(tmp_path, bfl_file(pairs, prefix="diffusion_model."))
    assert read_lora(path, family="flux2").format == "bfl"
    fused, unfused = ours_outputs(ours, path, x)
    for s, got_fused, got_unfused in zip(SCALES, fused, unfused, strict=True):
        by_hand = copy.deepcopy(ours)
        with torch.no_grad():
            for name, (down, up) in pairs.items():
                by_hand.get_submodule(name).weight += s * up @ down
        want = run_ours(by_hand, x)
        assert rel_err(got_fused, want) <= 1e-5 and rel_err(got_unfused, want) <= 1e-5


def test_fp8_weights_take_a_lora_and_give_it_back(tmp_path):
    model = quantize_linears(tiny_flux2(seed=4))
    x = tiny_flux2_inputs(model.params, B=1)
    pairs = random_pairs(linear_shapes(model), RANK, seed=8)
    fused, unfused = ours_outputs(model, write(tmp_path, bfl_file(pairs)), x)
    assert rel_err(fused[1], unfused[1]) < 0.1  # fused rounds W + dW to fp8 again; unfused keeps W as it was


def test_flux2_linears_are_the_models():
    model = tiny_flux2()
    found = {
        re.sub(r"\.\d+\.", ".{i}.", n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert found == set(FLUX2_LINEARS)


def test_flux_weights_inspect_names_the_family(tmp_path, pair, capsys):
    """diffusers names are FLUX.2's alone; official names are shared, so the MLP proportions decide (SwiGLU
    ratio 3 against FLUX.1's ratio 4); attention-only official LoRAs fit both families."""
    from weights_tools.cli import main as weights_main
    from weights_tools.inspect import inspect_path

    ours, ref, _ = pair
    kohya = write(tmp_path, kohya_file(random_pairs(linear_names(ours, in_blocks), RANK, 1), "lora_unet_", 2.0), "k.safetensors")
    diffusers = write(tmp_path, diffusers_file(random_pairs(ref.lora_free_names, RANK, 1)), "d.safetensors")
    attention = {n: s for n, s in linear_names(ours, in_blocks).items() if "_attn." in n}
    official = write(tmp_path, bfl_file(random_pairs(attention, RANK, 1), prefix="diffusion_model."), "b.safetensors")
    pixel = FLUX_MINI_DIR.parent / "loras" / "pixel.safetensors"  # flux-mini's: FLUX.1, official names
    found = {p.name: inspect_path(p)[0] for p in (kohya, diffusers, official, pixel)}
    assert {name: r["families"] for name, r in found.items()} == {
        "k.safetensors": ["FLUX.2"], "d.safetensors": ["FLUX.2"], "b.safetensors": ["FLUX.1", "FLUX.2"],
        "pixel.safetensors": ["FLUX.1"],
    }  # fmt: skip
    assert found["k.safetensors"]["format"] == "kohya" and found["d.safetensors"]["format"] == "diffusers"
    assert "single_blocks.{0..1}.linear1" in found["k.safetensors"]["targets"]["flow"]
    assert weights_main(["inspect", str(official)]) == 0
    assert "model     FLUX.1 or FLUX.2 (it updates modules both have, of the same shapes)\n" in capsys.readouterr().out
    # A FLUX.2 file read as FLUX.1 on a FLUX.1 model of the same width: its MLP shapes name it in the refusal.
    flux1 = linear_shapes(tiny_model())
    assert flux1["double_blocks.0.img_attn.qkv"] == (192, 64)  # the same width as the FLUX.2 file's
    assert refusal(lambda: updates_for(read_lora(kohya, family="flux1"), "flow", flux1)) == (
        f"{kohya}: lora_unet_double_blocks_0_img_mlp_0.lora_up.weight has 384 rows (a FLUX.2 MLP's proportions: a "
        "FLUX.2 LoRA); it updates 256 rows of double_blocks.0.img_mlp.0 (256 in all)"
    )
    # The input side tells them apart too (mlp.2 takes 3 x width in FLUX.2, 4 x in FLUX.1) ...
    down = write(tmp_path, bfl_file(random_pairs({"double_blocks.0.img_mlp.2": (64, 192)}, RANK, 1)), "m2.safetensors")
    assert refusal(lambda: updates_for(read_lora(down), "flow", flux1)) == (
        f"{down}: double_blocks.0.img_mlp.2.lora_A.weight takes 192 input features (a FLUX.2 MLP's proportions: a "
        "FLUX.2 LoRA); double_blocks.0.img_mlp.2 of this model takes 256 (a LoRA for a model of another width, or "
        "with extra input channels)"
    )
    # ... and a file of the model's own family on a model of another MLP ratio gets no such hint.
    own = write(tmp_path, bfl_file(random_pairs({"double_blocks.0.img_mlp.0": (256, 64)}, RANK, 1)), "own.safetensors")
    assert refusal(lambda: updates_for(read_lora(own), "flow", flux1 | {"double_blocks.0.img_mlp.0": (128, 64)})) == (
        f"{own}: double_blocks.0.img_mlp.0.lora_B.weight has 256 rows; it updates 128 rows of double_blocks.0.img_mlp.0 "
        "(128 in all)"
    )
    # FLUX.1-only names with FLUX.2 MLP shapes: FLUX.1 by its names, the shapes named.
    mixed = bfl_file(random_pairs({"double_blocks.0.img_mod.lin": (384, 64), "double_blocks.0.img_mlp.0": (384, 64)},
                                  RANK, 1))  # fmt: skip
    (report,) = inspect_path(write(tmp_path, mixed, "mixed.safetensors"))
    assert (report["families"], report["mlp_shapes_of"]) == (["FLUX.1"], ["FLUX.2"])
    empty = write(tmp_path, {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(0, 64),
                             "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(192, 0)}, "empty.safetensors")  # fmt: skip
    assert refusal(lambda: read_lora(empty, family="flux2")) == (
        f"{empty}: double_blocks.0.img_attn.qkv: down (0, 64) and up (192, 0) are empty (rank or width 0)"
    )
    # Several LoRA files in one folder: a report each.
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("k.safetensors", "b.safetensors"):
        (folder / name).write_bytes((tmp_path / name).read_bytes())
    assert [r["model"] for r in inspect_path(folder)] == ["lora", "lora"]
    # Shapes of no official model (another MLP ratio, as our training code can build): both families by name.
    odd = write(tmp_path, bfl_file(random_pairs({"double_blocks.0.img_mlp.0": (320, 64)}, RANK, 1)), "o.safetensors")
    (report,) = inspect_path(odd)
    assert (report["families"], report["official_mlp"], report["problem"]) == (["FLUX.1", "FLUX.2"], False, None)


# ---------------------------------------------------------------------------------------------- refusals


def refusal(call) -> str:
    with pytest.raises(LoraError) as e:
        call()
    return str(e.value)


def test_refusals_in_one_line(tmp_path, pair):
    ours, ref, _ = pair
    shapes = linear_shapes(ours)
    one = {"double_blocks.0.img_attn.proj": (64, 64)}

    path = write(tmp_path, xlabs_file(ours, RANK, seed=1), "xlabs.safetensors")
    assert refusal(lambda: read_lora(path, family="flux2")) == (
        f"{path}: a xlabs LoRA; FLUX.2 LoRA files are read in the diffusers, kohya, bfl formats only "
        "(xlabs files exist for FLUX.1)"
    )

    sd = diffusers_file(random_pairs({"transformer_blocks.0.attn.to_out.0": (64, 64)}, RANK, 1))
    sd |= {"text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(RANK, 8),
           "text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, RANK)}  # fmt: skip
    path = write(tmp_path, sd, "text.safetensors")
    assert refusal(lambda: read_lora(path, family="flux2")) == (
        f"{path}: diffusers LoRA for modules FLUX.2 does not have: text_encoder.model.layers.0.self_attn.q_proj; "
        "a FLUX.2 LoRA updates the Linears of the transformer (official or diffusers names) only "
        "(text-encoder LoRAs are not supported)"
    )

    sd = diffusers_file(random_pairs({"transformer_blocks.0.attn.to_q": (64, 32)}, RANK, 1))
    path = write(tmp_path, sd, "narrow.safetensors")
    assert refusal(lambda: updates_for(read_lora(path, family="flux2"), "flow", shapes)) == (
        f"{path}: transformer.transformer_blocks.0.attn.to_q.lora_A.weight takes 32 input features; "
        "double_blocks.0.img_attn.qkv of this model takes 64 (a LoRA for a model of another width, or with "
        "extra input channels)"
    )

    sd = diffusers_file(random_pairs({"transformer_blocks.0.attn.to_q": (128, 64)}, RANK, 1))
    path = write(tmp_path, sd, "tall.safetensors")
    assert refusal(lambda: updates_for(read_lora(path, family="flux2"), "flow", shapes)) == (
        f"{path}: transformer.transformer_blocks.0.attn.to_q.lora_B.weight has 128 rows; it updates 64 rows of "
        "double_blocks.0.img_attn.qkv (192 in all)"
    )

    sd = diffusers_file(random_pairs(one, RANK, 1), prefix="diffusion_model.") | {
        "double_blocks.0.img_norm.scale": torch.ones(64)
    }
    path = write(tmp_path, sd, "left.safetensors")
    assert refusal(lambda: read_lora(path, family="flux2")) == (
        f"{path}: 1 key(s) of this bfl LoRA are no LoRA tensor and would be left unused: double_blocks.0.img_norm.scale; "
        "refusing rather than dropping them silently (full replacement tensors, e.g. the RMSNorm scales of a "
        "control LoRA, are not applied)"
    )

    # A file read for FLUX.1 is not matched against FLUX.2 on the names the two share (and back).
    path = write(
        tmp_path,
        diffusers_file(random_pairs({"transformer_blocks.0.attn.to_q": (64, 64)}, RANK, 1)),
        "f1.safetensors",
    )
    assert refusal(lambda: updates_for(read_lora(path), "flow", shapes)) == (
        f"{path}: read as a FLUX.1 LoRA but the model is FLUX.2: read it with read_lora(path, family='flux2')"
    )
    flux1_shapes = {"double_blocks.0.img_attn.qkv": (192, 64)}
    assert refusal(lambda: updates_for(read_lora(path, family="flux2"), "flow", flux1_shapes)) == (
        f"{path}: read as a FLUX.2 LoRA but the model is FLUX.1: read it with read_lora(path, family='flux1')"
    )
