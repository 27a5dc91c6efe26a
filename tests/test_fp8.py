"""fp8 weights (flux_core/runtime/fp8.py): every fp8 file layout loads as fp8 and as full, the
error against bf16 is bounded, storage is half, and what cannot work is refused in one line."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_core import CheckpointError, load_flow_model
from flux_core.files import open_weights, read_header
from flux_core.formats import BFL_PREFIX, bfl_to_diffusers_transformer
from flux_core.runtime.fp8 import (
    E4M3_MAX,
    FP8,
    Fp8Linear,
    is_quantized_weight,
    quantize,
    quantize_linears,
    quantized_count,
    scale_key,
)
from weights_tools.cli import main as flux_weights
from weights_tools.convert import convert_file
from weights_tools.inspect import inspect_path
from weights_tools.random_weights import write_random_checkpoint
from weights_tools.verify import verify_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_inputs  # noqa: E402

# The layouts of fp8 files in the wild (runtime/fp8.py docstring), written from one bf16 file.
#   name: (keys prefixed model.diffusion_model., per-layer scale_weight, which weights are fp8)
LAYOUTS = {
    "scaled": (False, True, "blocks"),  # what `flux-weights convert --to fp8` writes
    "scaled-prefixed": (True, True, "blocks"),
    "unscaled": (False, False, "blocks"),
    "unscaled-prefixed": (True, False, "blocks"),
    # ComfyUI scaled_fp8: every 2-D weight fp8 (embedders and final layer too), scale_input beside
    # each scale_weight, shapes (1,), and the `scaled_fp8` marker tensor.
    "comfy-scaled-everything": (True, True, "all"),
}


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp8")
    return write_random_checkpoint("tiny", folder, seed=0, dtype="bfloat16", transformer_only=True).transformer


def write_layout(src: Path, dst: Path, layout: str) -> Path:
    prefixed, scaled, which = LAYOUTS[layout]
    comfy = which == "all"
    out = {}
    for key, t in load_file(src).items():
        if t.ndim == 2 and (comfy or is_quantized_weight(key, tuple(t.shape))):
            if scaled:
                out[key], scale = quantize(t)
                out[scale_key(key)] = scale.reshape(1) if comfy else scale
                if comfy:
                    out[key.removesuffix(".weight") + ".scale_input"] = torch.ones(1)
            else:  # unscaled: the weights' own values, rounded to e4m3fn
                out[key] = t.float().clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
        else:
            out[key] = t
    if comfy:
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file({(BFL_PREFIX + k if prefixed else k): v for k, v in out.items()}, dst, metadata=read_header(src)[2])
    return dst


def stored(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix(BFL_PREFIX): v for k, v in load_file(path).items()}


def bf16_inputs(model) -> dict:
    x = tiny_inputs(model)
    return {k: v.to(torch.bfloat16) if k in ("img", "txt", "timesteps", "y", "guidance") else v for k, v in x.items()}


def forward(model, x) -> torch.Tensor:
    with torch.inference_mode():
        return model(**x).float()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: dtype, shape and bytes (torch.equal has no float8 kernel on the CPU)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------
# Each layout loads as fp8 and as full


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_fp8_layout_loads_as_fp8_and_as_full(bf16_file, tmp_path, layout):
    path = write_layout(bf16_file, tmp_path / f"{layout}.safetensors", layout)
    sd = stored(path)
    _, scaled, _ = LAYOUTS[layout]

    q = load_flow_model(path, dtype=torch.bfloat16, weights="fp8")
    fp8_modules = {n: m for n, m in q.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8_modules) == 2 * 5 * q.params.depth + 3 * q.params.depth_single_blocks  # mod, qkv, proj, mlp x2 per stream; linear1, linear2, mod
    for name, m in fp8_modules.items():  # the file's fp8 tensors are kept bit for bit
        assert m.weight.dtype == FP8 and same(m.weight, sd[f"{name}.weight"])
        want = sd[f"{name}.scale_weight"].reshape(()) if scaled else torch.tensor(1.0)
        assert m.scale_weight.dtype == torch.float32 and torch.equal(m.scale_weight, want)

    full = load_flow_model(path, dtype=torch.bfloat16)  # fp8 loaded as bf16: upcast (times the scale), not refused
    for key, value in full.state_dict().items():
        want = sd[key].float()
        if scale_key(key) in sd:
            want = want * sd[scale_key(key)].float().reshape(())
        assert torch.equal(value, want.to(torch.bfloat16)), key
        if key in ("img_in.weight", "final_layer.linear.weight"):  # outside the blocks: the compute dtype
            assert q.state_dict()[key].dtype == torch.bfloat16 and torch.equal(q.state_dict()[key], value)

    # Same weights, same function: fp8 upcast per call rounds W = fp8 * scale once to bf16, as the
    # full load does, so the outputs are identical.
    x = bf16_inputs(full)
    out = forward(q, x)
    assert torch.isfinite(out).all() and torch.equal(out, forward(full, x))


def test_a_bf16_file_loaded_as_fp8_is_quantized_per_tensor(bf16_file):
    q = load_flow_model(bf16_file, dtype=torch.bfloat16, weights="fp8")
    sd = load_file(bf16_file)
    for name, m in q.named_modules():
        if isinstance(m, Fp8Linear):
            w = sd[f"{name}.weight"].float()
            assert torch.equal(m.scale_weight, w.abs().amax() / E4M3_MAX)  # amax lands on e4m3fn's largest value
            # The e4m3fn rounding bound: half an ulp, 2^-4 relative for normal numbers and 2^-10 x scale
            # (half the subnormal spacing 2^-9) below the smallest normal 2^-6.
            err = (m.weight.float() * m.scale_weight - w).abs()
            assert (err <= 2**-4 * w.abs() + 2**-10 * m.scale_weight).all(), name
            assert torch.equal(m.bias, sd[f"{name}.bias"])
    # The state dict of the fp8 model is the scaled layout: convert --to fp8 writes the same tensors.
    assert quantize_linears(load_flow_model(bf16_file, dtype=torch.bfloat16)).state_dict().keys() == q.state_dict().keys()


def test_convert_to_fp8_writes_the_scaled_layout_and_inspect_names_it(bf16_file, tmp_path, capsys):
    out = tmp_path / "fp8.safetensors"
    assert flux_weights(["convert", str(bf16_file), str(out), "--to", "fp8"]) == 0
    assert "bfl -> fp8" in capsys.readouterr().out
    q = load_flow_model(bf16_file, dtype=torch.bfloat16, weights="fp8")
    assert stored(out).keys() == q.state_dict().keys()
    for key, value in stored(out).items():
        assert same(value, q.state_dict()[key]), key

    n = sum(isinstance(m, Fp8Linear) for m in q.modules())
    (report,) = inspect_path(out)
    assert report["weights_format"] == f"fp8 (e4m3fn), scaled, {n} fp8 tensors"
    assert report["problem"] is None and report["matching_presets"] == ["tiny", "tiny-kontext"]
    assert inspect_path(bf16_file)[0]["weights_format"] == "full"
    assert flux_weights(["inspect", str(out)]) == 0
    assert f"weights   fp8 (e4m3fn), scaled, {n} fp8 tensors" in capsys.readouterr().out
    assert verify_file(out, "tiny").ok
    unscaled = write_layout(bf16_file, tmp_path / "u.safetensors", "unscaled-prefixed")
    assert inspect_path(unscaled)[0]["weights_format"] == f"fp8 (e4m3fn), unscaled, {n} fp8 tensors"
    assert verify_file(unscaled, "tiny").ok
    # A diffusers file converts to fp8 too (to the official layout, then quantized): the same tensors.
    diffusers = tmp_path / "diffusers.safetensors"
    save_file(bfl_to_diffusers_transformer(load_file(bf16_file)), diffusers)
    convert_file(diffusers, tmp_path / "from-diffusers.safetensors", to="fp8")
    for key, value in stored(tmp_path / "from-diffusers.safetensors").items():
        assert same(value, q.state_dict()[key]), key


# ----------------------------------------------------------------------------------------------
# Storage and error


def test_fp8_storage_is_half_the_bf16_bytes_of_the_linear_weights(bf16_file):
    full = load_flow_model(bf16_file, dtype=torch.bfloat16)
    q = load_flow_model(bf16_file, dtype=torch.bfloat16, weights="fp8")
    names = [n for n, m in q.named_modules() if isinstance(m, Fp8Linear)]
    fp8_bytes = sum(q.get_submodule(n).weight.nbytes for n in names)
    bf16_bytes = sum(full.get_submodule(n).weight.nbytes for n in names)
    assert fp8_bytes * 2 == bf16_bytes  # exactly 0.5x; plus one float32 scale (4 bytes) per layer
    assert fp8_bytes == quantized_count(open_weights(bf16_file)) == sum(
        v.numel() for k, v in full.state_dict().items() if is_quantized_weight(k, tuple(v.shape))
    )


# The relative error of the whole forward, fp8 weights against the same bf16 weights, both computing
# in bf16: measured 0.22%-0.23% on seeds 0, 1, 2 of the tiny preset (bf16 against float32 compute is
# 0.52%-0.56% on the same inputs, so fp8 storage costs less than bf16 arithmetic does). Asserted with
# a 4x margin. benchmarks/fp8.py measures the full width (hidden 3072).
FORWARD_BOUND = 0.01


def test_fp8_output_against_bf16_within_the_stated_bound(bf16_file):
    full = load_flow_model(bf16_file, dtype=torch.bfloat16)
    q = load_flow_model(bf16_file, dtype=torch.bfloat16, weights="fp8")
    x = bf16_inputs(full)
    error = rel(forward(q, x), forward(full, x))
    assert 0 < error < FORWARD_BOUND


@pytest.fixture(scope="module")
def fp8_models(tiny_checkpoint):
    from fluxspace import load_models

    return load_models(tiny_checkpoint.transformer, weights="fp8")


def test_fluxspace_edit_runs_on_an_fp8_model_close_to_the_full_one(models, fp8_models):
    # step.py calls block submodules (txt_attn.qkv_heads, img_attn.proj, txt_mlp) directly: they are Fp8Linear now.
    from fluxspace import Concept, EditSpec, SampleSettings, edit_image

    assert isinstance(fp8_models.flow.double_blocks[0].img_attn.proj, Fp8Linear) and fp8_models.weights == "fp8"
    assert fp8_models.dtype == models.dtype == torch.float32  # compute dtype: the CPU default
    settings = SampleSettings(width=64, height=48, steps=4)
    spec = EditSpec(concepts=(Concept("glasses", 4.0, 0.5),), start=1)
    a = edit_image(models, "a smiling woman", spec, seed=5, settings=settings, progress=False)
    b = edit_image(fp8_models, "a smiling woman", spec, seed=5, settings=settings, progress=False)
    for full, fp8 in ((a.original, b.original), (a.edited, b.edited)):
        diff = np.abs(np.asarray(full, dtype=np.float32) - np.asarray(fp8, dtype=np.float32))
        # In 0..255: measured mean 0.0015 (original) and 0.0021 (edited), max 1 (seed 5).
        assert diff.mean() < 0.1 and diff.max() <= 2, (diff.mean(), diff.max())
    assert torch.allclose(a.masks[0], b.masks[0], atol=0.01)  # measured: identical


def test_png_metadata_records_the_weights_format(fp8_models):
    from fluxspace import SampleSettings
    from fluxspace.metadata import run_metadata

    meta = run_metadata("generate", fp8_models, SampleSettings(width=64, height=48, steps=2))
    assert meta["weights_format"] == "fp8"
    json.dumps(meta)


# ----------------------------------------------------------------------------------------------
# Refused, each in one line that says what is wrong


def test_refuses_an_unknown_weights_format_and_fp8_where_torch_has_no_float8(bf16_file):
    with pytest.raises(ValueError, match=r"^unknown weights format 'fp4'; valid: full, fp8$"):
        load_flow_model(bf16_file, weights="fp4")
    try:
        torch.zeros(1, dtype=FP8, device="mps")
        pytest.skip("this torch holds float8 on MPS")
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    message = r"fp8 weights need float8_e4m3fn tensors, which torch .* cannot hold on mps; use --weights full"
    with pytest.raises(ValueError, match=message):
        load_flow_model(bf16_file, device="mps", weights="fp8")
    from fluxspace import load_models

    with pytest.raises(ValueError, match=message):
        load_models(bf16_file, device="mps", weights="fp8")


def _with(src: Path, dst: Path, change) -> Path:
    sd = load_file(src)
    change(sd)
    save_file(sd, dst, metadata=read_header(src)[2])
    return dst


QKV = "double_blocks.0.img_attn.qkv"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.update({f"{QKV}.scale_weight": torch.tensor(0.01)}),
         rf"{QKV}.scale_weight scales {QKV}.weight, which is BF16; a scale_weight belongs beside a float8 weight"),
        (lambda sd: sd.update({"double_blocks.0.img_attn.nothing.scale_weight": torch.tensor(0.01)}),
         r"double_blocks.0.img_attn.nothing.scale_weight scales double_blocks.0.img_attn.nothing.weight, which is missing"),
        (lambda sd: sd.update({f"{QKV}.weight": sd[f"{QKV}.weight"].to(FP8), f"{QKV}.scale_weight": torch.ones(3)}),
         rf"{QKV}.scale_weight is F32 \(3,\); a fp8 scale is one number \(shape \(\) or \(1,\)\) of dtype F32, BF16, F16"),
        (lambda sd: sd.update({f"{QKV}.weight": sd[f"{QKV}.weight"].to(FP8), f"{QKV}.scale_weight": torch.ones((), dtype=torch.int32)}),
         rf"{QKV}.scale_weight is I32 \(\); a fp8 scale is one number"),
        (lambda sd: sd.update({f"{QKV}.weight": sd[f"{QKV}.weight"].to(FP8), f"{QKV}.scale_input": torch.ones(2)}),
         rf"{QKV}.scale_input is F32 \(2,\); a fp8 scale is one number"),
    ],
)  # fmt: skip
def test_refuses_a_malformed_fp8_layout_before_reading_a_tensor(bf16_file, tmp_path, change, message):
    path = _with(bf16_file, tmp_path / "bad.safetensors", change)
    for weights in ("full", "fp8"):
        with pytest.raises(CheckpointError, match=message):
            load_flow_model(path, weights=weights)
    with pytest.raises(CheckpointError, match=message):
        verify_file(path, "tiny")
    assert message.split(" ")[0].replace("\\", "") in inspect_path(path)[0]["problem"]


def test_refuses_a_non_finite_scale_and_scales_in_a_diffusers_file(bf16_file, tmp_path):
    scaled = tmp_path / "scaled.safetensors"
    convert_file(bf16_file, scaled, to="fp8")
    nan = _with(scaled, tmp_path / "nan.safetensors", lambda sd: sd.update({f"{QKV}.scale_weight": torch.tensor(float("nan"))}))
    for weights in ("full", "fp8"):
        with pytest.raises(CheckpointError, match=rf"nan.safetensors: {QKV}.scale_weight is nan; a scale_weight must be a finite number"):
            load_flow_model(nan, weights=weights)
    sd = load_file(scaled)
    diffusers = {**bfl_to_diffusers_transformer({k: v for k, v in sd.items() if not k.endswith(".scale_weight")}),
                 "transformer_blocks.0.attn.to_out.0.scale_weight": torch.tensor(1.0)}  # fmt: skip
    save_file(diffusers, tmp_path / "diffusers.safetensors")
    with pytest.raises(CheckpointError, match=r"fp8 scale tensors .* are read in the official \(BFL\) layout only"):
        load_flow_model(tmp_path / "diffusers.safetensors", weights="fp8")


def test_convert_to_fp8_refuses_an_autoencoder_and_a_scaled_file(tiny_checkpoint, bf16_file, tmp_path):
    with pytest.raises(CheckpointError, match=r"holds an autoencoder; --to fp8 converts a Flux transformer"):
        convert_file(tiny_checkpoint.ae, tmp_path / "ae.safetensors", to="fp8")
    convert_file(bf16_file, tmp_path / "scaled.safetensors", to="fp8")
    with pytest.raises(CheckpointError, match=r"is already a scaled fp8 file"):
        convert_file(tmp_path / "scaled.safetensors", tmp_path / "again.safetensors", to="fp8")
    assert not (tmp_path / "ae.safetensors").exists() and not (tmp_path / "again.safetensors").exists()


def test_quantize_linears_on_a_model_in_memory(bf16_file):
    # The benchmark's path: a loaded model rewritten from outside; only the blocks' Linears change.
    full = load_flow_model(bf16_file, dtype=torch.bfloat16)
    q = quantize_linears(load_flow_model(bf16_file, dtype=torch.bfloat16))
    assert type(q.img_in) is torch.nn.Linear and type(q.final_layer.linear) is torch.nn.Linear
    assert isinstance(q.single_blocks[0].linear1, Fp8Linear) and isinstance(q.double_blocks[0].img_mlp[0], Fp8Linear)
    x = bf16_inputs(full)
    assert rel(forward(q, x), forward(full, x)) < FORWARD_BOUND
    empty = torch.nn.Linear(4, 2)
    torch.nn.init.zeros_(empty.weight)
    assert Fp8Linear.from_linear(empty).scale_weight.item() == 1.0  # an all-zero weight: scale 1, not 0/0


def test_fluxspace_cli_weights_fp8(tiny_checkpoint, tmp_path):
    from fluxspace.cli import main
    from fluxspace.images import read_png_params

    out = tmp_path / "fp8.png"
    small = ["--width", "64", "--height", "48", "--steps", "2", "--quiet"]
    assert main(["generate", "a red bicycle", "--model", str(tiny_checkpoint.transformer), "--weights", "fp8", "--out", str(out), *small]) == 0
    params = read_png_params(out)
    assert params["weights_format"] == "fp8" and params["dtype"] == "float32"
