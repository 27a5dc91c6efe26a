"""`flux-weights` on FLUX.2 files: random, inspect, verify, convert, driven through main([...]) on tiny files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from weights_cli import random_set, run

from flux_core.files import read_header
from flux_core.flux2.conditioner import load_text_encoder
from flux_core.flux2.loading import load_flux2_autoencoder, load_flux2_model
from flux_core.flux2.model import Flux2
from flux_core.inference import flux_metadata
from flux_core.presets import get_preset
from weights_tools import random_weights

TINY = get_preset("tiny-flux2")
TINY_PARAMS = 343_296  # transformer parameters of tiny-flux2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return random_set(tmp_path_factory.mktemp("tiny-flux2"), "tiny-flux2")


# ----------------------------------------------------------------------------------------------
# random


def test_random_writes_a_loadable_official_set(ckpt, tmp_path, capsys):
    assert sorted(p.name for p in ckpt.iterdir()) == ["ae.safetensors", "flux2-tiny.safetensors", "text_encoder",
                                                      "tokenizer"]  # fmt: skip
    model = load_flux2_model(ckpt / "flux2-tiny.safetensors")  # no preset: the metadata has the RoPE axes
    assert model.params == TINY.params
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMS
    ae = load_flux2_autoencoder(ckpt / "ae.safetensors")
    assert ae.params == TINY.ae_params
    sd = load_file(ckpt / "ae.safetensors")
    assert sd["bn.num_batches_tracked"].dtype == torch.int64 and sd["bn.num_batches_tracked"].item() == 0
    assert (sd["bn.running_var"] > 0).all()  # a variance: 1 + N(0, 0.02^2)
    code, out, err = run(
        capsys, "random", "--preset", "tiny-flux2", "--out", tmp_path, "--dtype", "float32", "--seed", "3"
    )
    assert (code, err) == (0, "")
    assert out == (
        f"wrote {tmp_path / 'flux2-tiny.safetensors'}\nwrote {tmp_path / 'ae.safetensors'}\n"
        f"wrote {tmp_path}/text_encoder, tokenizer\n"
    )
    # The tiny Qwen3 in klein's slot: 3 layers read x width 16 = the transformer's 48 features a token.
    text = load_text_encoder(ckpt, "klein", dtype=torch.float32)
    assert text(["a red car"]).shape == (1, 512, TINY.params.context_in_dim)
    for name in ("flux2-tiny.safetensors", "ae.safetensors", "text_encoder/model.safetensors"):  # same seed, same bytes
        assert (tmp_path / name).read_bytes() == (ckpt / name).read_bytes()


def test_random_pruned(tmp_path, capsys):
    code, out, _ = run(capsys, "random", "--preset", "tiny-flux2", "--out", tmp_path, "--depth", "0",
                       "--transformer-only")  # fmt: skip
    assert code == 0 and out == f"wrote {tmp_path / 'flux2-tiny-d0s2.safetensors'}\n"
    model = load_flux2_model(tmp_path / "flux2-tiny-d0s2.safetensors")
    assert (model.params.depth, model.params.depth_single_blocks) == (0, 2)


def test_random_refuses_large_sets_unless_asked(tmp_path, capsys, monkeypatch):
    out = tmp_path / "big"
    code, stdout, err = run(capsys, "random", "--preset", "flux2-dev", "--out", out)
    assert (code, stdout) == (2, "")
    assert err == (
        "error: preset 'flux2-dev' would write 64.8 GB (transformer 64.4 GB in bfloat16 + autoencoder 0.3 GB in "
        "float32), above the 4 GiB limit; pass --allow-large to write it anyway, or fewer blocks with --depth / "
        "--depth-single\n"
    )
    assert not out.exists()  # refused before anything was written
    code, _, err = run(capsys, "random", "--preset", "flux2-klein-9b", "--out", out, "--transformer-only")
    assert code == 2 and err.startswith(
        "error: preset 'flux2-klein-9b' would write 18.2 GB (transformer 18.2 GB in"
    )
    # The flag lifts the limit (shown on a limit below the tiny set's size).
    monkeypatch.setattr(random_weights, "MAX_BYTES", 1000)
    code, _, err = run(capsys, "random", "--preset", "tiny-flux2", "--out", out)
    assert code == 2 and "above the 0 GiB limit; pass --allow-large" in err
    assert run(capsys, "random", "--preset", "tiny-flux2", "--out", out, "--allow-large")[0] == 0
    assert (out / "flux2-tiny.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# inspect


def test_inspect_says_family_and_variant(ckpt, capsys):
    code, out, _ = run(capsys, "inspect", ckpt / "flux2-tiny.safetensors")
    assert code == 0
    assert "layout    official (BFL) transformer\nfamily    FLUX.2\n" in out
    assert "variant   tiny-flux2 (the preset the file's metadata records; its keys are dev-shaped)\n" in out
    assert f"tensors   31, {TINY_PARAMS:,} parameters, dtypes F32 x31\n" in out
    assert "presets   tiny-flux2, tiny-flux2-dev\n" in out
    assert "  single_blocks.{0..1}.linear1.weight  x2  (576, 64)  F32\n" in out  # 3 x 64 + 2 x 192 rows
    report = json.loads(run(capsys, "inspect", ckpt / "ae.safetensors", "--json")[1])
    assert (report["family"], report["model"], report["variant"]) == ("flux2", "ae", "ae")
    assert report["dtypes"] == {"F32": 178, "I64": 1}
    assert report["matching_presets"] == ["tiny-flux2", "tiny-flux2-dev"] and report["problem"] is None


def test_inspect_klein_and_dev_shaped_files(tmp_path, capsys):
    import dataclasses

    for guidance, variant, note in (
        (False, "klein", "klein-shaped: FLUX.2 [klein] distilled and base models share these keys"),
        (True, "dev", "guidance-distilled: has guidance_in (FLUX.2 [dev]-shaped)"),
    ):
        params = dataclasses.replace(TINY.params, guidance_embed=guidance)
        path = tmp_path / f"{variant}.safetensors"
        save_file(Flux2(params).state_dict(), path, metadata=flux_metadata(params))
        report = json.loads(run(capsys, "inspect", path, "--json")[1])
        assert (report["family"], report["variant"]) == ("flux2", variant)
        assert report["variant_note"].startswith(note)
        assert report["params"]["guidance_embed"] is guidance


def test_inspect_flux1_file_says_flux1(tmp_path, capsys):
    random_weights.write_random_checkpoint("tiny", tmp_path, transformer_only=True)
    code, out, _ = run(capsys, "inspect", tmp_path / "flux1-tiny.safetensors")
    assert code == 0 and "family    FLUX.1\n" in out


# ----------------------------------------------------------------------------------------------
# verify


def test_verify(ckpt, tmp_path, capsys):
    path = ckpt / "flux2-tiny.safetensors"
    assert run(capsys, "verify", path, "--preset", "tiny-flux2") == (
        0, f"OK: {path} (bfl transformer, 31 tensors) matches preset 'tiny-flux2'\n", ""
    )  # fmt: skip
    assert run(capsys, "verify", ckpt / "ae.safetensors", "--preset", "tiny-flux2")[0] == 0
    code, out, _ = run(capsys, "verify", path, "--preset", "tiny")
    assert code == 1
    assert out == (
        f"FAIL: {path} (bfl transformer, 31 tensors) does not match preset 'tiny'\n"
        "  the file holds a FLUX.2 transformer, but preset 'tiny' is a FLUX.1 model; FLUX.2 presets: flux2-dev, "
        "flux2-klein-4b, flux2-klein-9b, flux2-klein-base-4b, flux2-klein-base-9b, tiny-flux2, tiny-flux2-dev\n"
    )
    # Against a real size: every shape differs; a klein preset also misses guidance_in.
    code, out, _ = run(capsys, "verify", path, "--preset", "flux2-klein-4b")
    assert code == 1
    assert "\n  2 unexpected: guidance_in.in_layer.weight, guidance_in.out_layer.weight\n" in out
    assert (
        "\n  29 mis-shaped (first 10):\n    double_blocks.0.img_attn.norm.key_norm.scale: file (32,) != expected (128,)\n"
        in out
    )
    assert out.endswith(
        "  hint: the file has guidance_in.*: it is a dev-type model, the preset is klein-type\n"
    )
    sd = load_file(path)
    del sd["guidance_in.in_layer.weight"], sd["guidance_in.out_layer.weight"]
    klein = tmp_path / "klein.safetensors"
    save_file(sd, klein, metadata=read_header(path)[2])
    code, out, _ = run(capsys, "verify", klein, "--preset", "tiny-flux2")
    assert code == 1
    assert out.endswith(
        "  2 missing: guidance_in.in_layer.weight, guidance_in.out_layer.weight\n"
        "  hint: the file has no guidance_in.*: it is a klein-type model, the preset is dev-type\n"
    )


# ----------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize("name", ["flux2-tiny.safetensors", "ae.safetensors"])
def test_convert_round_trip_is_bit_exact(ckpt, tmp_path, capsys, name):
    src, mid, back = ckpt / name, tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"
    code, out, _ = run(capsys, "convert", src, mid, "--to", "diffusers")
    model = "transformer" if name.startswith("flux2") else "ae"
    n_in = len(load_file(src))
    n_mid = n_in + 4 if model == "transformer" else n_in  # the double block's two qkv split in three
    assert (code, out) == (0, f"wrote {mid}: {model}, bfl -> diffusers, {n_in} -> {n_mid} tensors\n")
    assert run(capsys, "convert", mid, back, "--to", "bfl")[0] == 0
    assert back.read_bytes() == src.read_bytes()
    code, _, err = run(capsys, "convert", src, tmp_path / "x.safetensors", "--to", "bfl")
    assert (code, err) == (2, f"error: {src} is already in the bfl layout\n")


def test_convert_to_fp8_loads(ckpt, tmp_path, capsys):
    dst = tmp_path / "fp8.safetensors"
    code, out, _ = run(capsys, "convert", ckpt / "flux2-tiny.safetensors", dst, "--to", "fp8")
    assert (code, out) == (0, f"wrote {dst}: transformer, bfl -> fp8, 31 -> 43 tensors\n")
    report = json.loads(run(capsys, "inspect", dst, "--json")[1])
    assert report["weights_format"] == "fp8 (e4m3fn), scaled, 12 fp8 tensors" and report["family"] == "flux2"
    full, from_fp8 = load_flux2_model(ckpt / "flux2-tiny.safetensors"), load_flux2_model(dst)
    w, q = full.double_blocks[0].img_attn.qkv.weight, from_fp8.double_blocks[0].img_attn.qkv.weight
    assert q.dtype == torch.float32 and 0 < ((w - q).norm() / w.norm()).item() < 0.05
    code, _, err = run(
        capsys, "convert", ckpt / "ae.safetensors", tmp_path / "ae8.safetensors", "--to", "fp8"
    )
    assert (code, err) == (
        2,
        f"error: {ckpt / 'ae.safetensors'} holds an autoencoder; --to fp8 converts a Flux transformer\n",
    )
