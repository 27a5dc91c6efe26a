"""The `flux-weights` CLI (weights_tools), driven through main([...]) on temporary files, tiny preset."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from weights_cli import random_set, run

from flux_core import get_preset
from flux_core.loading import load_autoencoder, load_flow_model
from flux_core.sampling import img_ids, txt_ids
from weights_tools.cli import main
from weights_tools.diffusers_reference import diffusers_transformer

TINY = get_preset("tiny")
TINY_PARAMS = 340_160  # transformer parameters of the tiny preset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A full random set of the tiny preset: transformer, AE and text encoders."""
    return random_set(tmp_path_factory.mktemp("tiny"), "tiny")


def files_equal(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


# ----------------------------------------------------------------------------------------------
# random


def test_random_writes_a_loadable_official_set(ckpt):
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "ae.safetensors",
        "flux1-tiny.safetensors",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ]
    # Text encoders sized from the preset: T5 width = context_in_dim, CLIP width = vec_in_dim.
    t5 = json.loads((ckpt / "text_encoder_2" / "config.json").read_text())
    clip = json.loads((ckpt / "text_encoder" / "config.json").read_text())
    t5_tokenizer = json.loads((ckpt / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert (t5["d_model"], clip["hidden_size"]) == (TINY.params.context_in_dim, TINY.params.vec_in_dim)
    assert t5_tokenizer["model_max_length"] == TINY.t5_max_length
    with safe_open(ckpt / "flux1-tiny.safetensors", framework="pt") as f:
        assert f.metadata()["fluxspace.preset"] == "tiny"
        assert json.loads(f.metadata()["fluxspace.axes_dim"]) == [8, 12, 12]
    with safe_open(ckpt / "ae.safetensors", framework="pt") as f:
        assert float(f.metadata()["fluxspace.scale_factor"]) == 0.3611
        assert float(f.metadata()["fluxspace.shift_factor"]) == 0.1159

    model = load_flow_model(ckpt / "flux1-tiny.safetensors")  # no preset: all from shapes + metadata
    assert model.params == TINY.params
    ae = load_autoencoder(ckpt / "ae.safetensors")
    assert ae.params == TINY.ae_params

    # Values are sensible: a forward pass and a decode stay finite and non-trivial.
    g = torch.Generator().manual_seed(0)
    p = TINY.params
    with torch.inference_mode():
        v = model(
            img=torch.randn(1, 16, p.in_channels, generator=g),
            img_ids=img_ids(1, 64, 64),
            txt=torch.randn(1, 5, p.context_in_dim, generator=g),
            txt_ids=txt_ids(1, 5),
            timesteps=torch.tensor([0.5]),
            y=torch.randn(1, p.vec_in_dim, generator=g),
            guidance=torch.tensor([3.5]),
        )
        x = ae.decode(torch.randn(1, 16, 4, 4, generator=g))
    assert torch.isfinite(v).all() and v.std() > 1e-3
    assert torch.isfinite(x).all() and x.shape == (1, 3, 32, 32)


def test_random_is_deterministic(tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert (
            run(
                capsys,
                "random",
                "--preset",
                "tiny",
                "--out",
                tmp_path / name,
                "--seed",
                seed,
                "--transformer-only",
            )[0]
            == 0
        )
    a, b, c = (tmp_path / n / "flux1-tiny.safetensors" for n in "abc")
    assert files_equal(a, b)
    assert not files_equal(a, c)
    assert not (tmp_path / "a" / "ae.safetensors").exists()
    sd = load_file(a)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}  # the default dtype
    # weights ~ N(0, 0.02), norm scales ~ 1 + N(0, 0.02)
    assert 0.015 < sd["single_blocks.0.linear1.weight"].float().std() < 0.025
    assert abs(sd["single_blocks.0.norm.query_norm.scale"].float().mean() - 1) < 0.02


def test_random_pruned_model(tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "random",
        "--preset",
        "tiny",
        "--out",
        tmp_path,
        "--depth",
        2,
        "--depth-single",
        1,
        "--transformer-only",
        "--dtype",
        "float32",
    )
    assert code == 0 and "flux1-tiny-d2s1.safetensors" in out
    model = load_flow_model(tmp_path / "flux1-tiny-d2s1.safetensors")
    assert (model.params.depth, model.params.depth_single_blocks) == (2, 1)


def test_random_refuses_to_overwrite(ckpt, capsys):
    code, _, err = run(capsys, "random", "--preset", "tiny", "--out", ckpt)
    assert code == 2
    assert err == f"error: {ckpt / 'flux1-tiny.safetensors'} already exists; pass --force to overwrite it\n"


def test_unknown_preset(tmp_path, capsys):
    expected = (
        "error: unknown preset 'flux-pro'; valid presets: flux-dev, flux-kontext-dev, flux-krea-dev, flux-mini, flux-mini-kontext, flux-schnell, "
        "flux2-dev, flux2-klein-4b, flux2-klein-9b, flux2-klein-base-4b, flux2-klein-base-9b, tiny, tiny-flux2, tiny-flux2-dev, tiny-kontext\n"
    )
    assert run(capsys, "random", "--preset", "flux-pro", "--out", tmp_path) == (2, "", expected)
    assert run(capsys, "verify", tmp_path / "x.safetensors", "--preset", "flux-pro") == (2, "", expected)


# ----------------------------------------------------------------------------------------------
# inspect


def test_inspect_text(ckpt, capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", ckpt / "flux1-tiny.safetensors")
    assert code == 0
    assert "variant   tiny (the preset the file's metadata records; its keys are dev-shaped)\n" in out
    assert f"tensors   60, {TINY_PARAMS:,} parameters, dtypes F32 x60\n" in out
    assert "presets   tiny, tiny-kontext\n" in out  # a Kontext model has its base model's shape
    assert "  single_blocks.{0..1}.linear1.weight  x2  (448, 64)  F32\n" in out


def test_inspect_names_the_variant_from_metadata_as_the_keys_cannot_tell_kontext_from_dev(ckpt, capsys, tmp_path):
    tensors = load_file(ckpt / "flux1-tiny.safetensors")
    save_file(tensors, tmp_path / "bare.safetensors")  # no metadata: the keys alone
    save_file(tensors, tmp_path / "kontext.safetensors", metadata={"fluxspace.preset": "tiny-kontext"})
    code, out, _ = run(capsys, "inspect", tmp_path / "bare.safetensors")
    assert code == 0
    assert ("variant   dev (dev-shaped: FLUX.1 [dev], Krea [dev] and Kontext [dev] share these keys; the model is "
            "--preset flux-dev / flux-krea-dev / flux-kontext-dev, or the preset the file's metadata records)\n") in out
    code, out, _ = run(capsys, "inspect", tmp_path / "kontext.safetensors")
    assert code == 0
    assert "variant   tiny-kontext (the preset the file's metadata records; its keys are dev-shaped)\n" in out


def test_inspect_json_and_keys(ckpt, capsys):
    code, out, _ = run(capsys, "inspect", ckpt / "flux1-tiny.safetensors", "--json", "--keys")
    report = json.loads(out)
    assert code == 0
    assert (report["layout"], report["model"], report["variant"]) == ("bfl", "transformer", "tiny")
    assert report["num_params"] == TINY_PARAMS
    assert report["params"]["depth_single_blocks"] == 2 and report["params"]["axes_dim"] == [8, 12, 12]
    assert len(report["keys"]) == 60
    assert report["keys"]["txt_in.weight"] == {"shape": [64, 32], "dtype": "F32"}

    report = json.loads(run(capsys, "inspect", ckpt / "ae.safetensors", "--json")[1])
    assert (report["model"], report["variant"], report["num_tensors"]) == ("ae", "ae", 172)
    assert report["matching_presets"] == ["tiny", "tiny-kontext"]


def test_inspect_unknown_file(tmp_path, capsys):
    path = tmp_path / "other.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}, path)
    report = json.loads(run(capsys, "inspect", path, "--json")[1])
    assert (report["layout"], report["variant"], report["num_params"]) == ("unknown", "unknown", 8)


# ----------------------------------------------------------------------------------------------
# verify


def test_verify_ok(ckpt, capsys):
    path = ckpt / "flux1-tiny.safetensors"
    assert run(capsys, "verify", path, "--preset", "tiny") == (
        0,
        f"OK: {path} (bfl transformer, 60 tensors) matches preset 'tiny'\n",
        "",
    )
    assert run(capsys, "verify", ckpt / "ae.safetensors", "--preset", "tiny")[0] == 0


def test_verify_accepts_the_official_prefix(ckpt, tmp_path, capsys):
    sd = load_file(ckpt / "flux1-tiny.safetensors")
    path = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, path)
    assert run(capsys, "verify", path, "--preset", "tiny")[0] == 0


def test_verify_lists_missing_unexpected_and_misshaped(ckpt, tmp_path, capsys):
    sd = load_file(ckpt / "flux1-tiny.safetensors")
    del sd["single_blocks.1.linear2.bias"]
    sd["double_blocks.0.img_attn.extra.weight"] = torch.zeros(2)
    sd["txt_in.weight"] = torch.zeros(64, 48)
    path = tmp_path / "doctored.safetensors"
    save_file(sd, path)
    code, out, _ = run(capsys, "verify", path, "--preset", "tiny")
    assert code == 1
    assert out == (
        f"FAIL: {path} (bfl transformer, 60 tensors) does not match preset 'tiny'\n"
        "  1 missing: single_blocks.1.linear2.bias\n"
        "  1 unexpected: double_blocks.0.img_attn.extra.weight\n"
        "  1 mis-shaped:\n"
        "    txt_in.weight: file (64, 48) != expected (64, 32)\n"
    )


def test_verify_hints_at_dev_versus_schnell(ckpt, tmp_path, capsys):
    sd = {
        k: v
        for k, v in load_file(ckpt / "flux1-tiny.safetensors").items()
        if not k.startswith("guidance_in.")
    }
    path = tmp_path / "schnell-like.safetensors"
    save_file(sd, path)
    code, out, _ = run(capsys, "verify", path, "--preset", "tiny")
    assert code == 1
    assert (
        "  hint: the file has no guidance_in.*: it is a schnell-type model, the preset is dev-type\n" in out
    )


# ----------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize("name", ["flux1-tiny.safetensors", "ae.safetensors"])
def test_convert_round_trip_is_bit_exact(ckpt, tmp_path, capsys, name):
    src, mid, back = ckpt / name, tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"
    assert run(capsys, "convert", src, mid, "--to", "diffusers")[0] == 0
    assert run(capsys, "convert", mid, back, "--to", "bfl")[0] == 0
    original, returned = load_file(src), load_file(back)
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)
    assert files_equal(src, back)  # same key order, same metadata: the very same bytes

    # The diffusers-layout file loads strictly into diffusers' own model of the same shape.
    p = TINY.params
    with torch.device("meta"):
        if name.startswith("flux1"):
            ref = diffusers_transformer(p)
        else:
            a = TINY.ae_params
            ref = AutoencoderKL(
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[a.ch * m for m in a.ch_mult],
                layers_per_block=a.num_res_blocks,
                latent_channels=a.z_channels,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
    ref.load_state_dict(load_file(mid), strict=True, assign=True)


def test_convert_diffusers_pipeline_folder(ckpt, tmp_path, capsys):
    pipe = tmp_path / "pipe"
    assert (
        main(
            [
                "convert",
                str(ckpt / "flux1-tiny.safetensors"),
                str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"),
                "--to",
                "diffusers",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "convert",
                str(ckpt / "ae.safetensors"),
                str(pipe / "vae" / "diffusion_pytorch_model.safetensors"),
                "--to",
                "diffusers",
            ]
        )
        == 0
    )
    capsys.readouterr()

    reports = json.loads(run(capsys, "inspect", pipe, "--json")[1])
    assert [(r["layout"], r["variant"]) for r in reports] == [("diffusers", "tiny"), ("diffusers", "ae")]
    assert reports[0]["num_params"] == TINY_PARAMS

    code, _, err = run(capsys, "convert", pipe, tmp_path / "x.safetensors", "--to", "bfl")
    assert (code, err) == (
        2,
        f"error: {pipe} holds both transformer/ and vae/: choose one with --model transformer or --model ae\n",
    )
    assert run(capsys, "verify", pipe, "--preset", "tiny", "--model", "transformer")[0] == 0
    assert (
        run(capsys, "convert", pipe, tmp_path / "t.safetensors", "--to", "bfl", "--model", "transformer")[0]
        == 0
    )
    assert files_equal(tmp_path / "t.safetensors", ckpt / "flux1-tiny.safetensors")


def test_convert_refuses_to_overwrite_and_force_overwrites(ckpt, tmp_path, capsys):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    code, _, err = run(capsys, "convert", ckpt / "ae.safetensors", dst, "--to", "diffusers")
    assert (code, err) == (2, f"error: {dst} already exists; pass --force to overwrite it\n")
    assert dst.read_bytes() == b"keep me"
    assert run(capsys, "convert", ckpt / "ae.safetensors", dst, "--to", "diffusers", "--force")[0] == 0
    assert len(load_file(dst)) == 172
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temporary file left behind


def test_convert_errors(ckpt, tmp_path, capsys):
    src = ckpt / "flux1-tiny.safetensors"
    assert run(capsys, "convert", src, tmp_path / "x.safetensors", "--to", "bfl") == (
        2,
        "",
        f"error: {src} is already in the bfl layout\n",
    )
    assert run(capsys, "convert", src, tmp_path / "x.safetensors", "--to", "diffusers", "--model", "ae") == (
        2,
        "",
        f"error: {src} holds a Flux transformer, not an autoencoder\n",
    )
    with pytest.raises(SystemExit) as e:  # argparse: bad choice
        main(["convert", str(src), str(tmp_path / "x.safetensors"), "--to", "comfy"])
    assert e.value.code == 2
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------
# broken files


def test_truncated_file(ckpt, tmp_path, capsys):
    src = ckpt / "flux1-tiny.safetensors"
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(src.read_bytes()[:-100])
    size = src.stat().st_size
    expected = (
        f"error: {path} is truncated: its header describes {size} bytes but the file has {size - 100}; "
        "download or copy it again\n"
    )
    for command in (
        ["inspect", path],
        ["verify", path, "--preset", "tiny"],
        ["convert", path, tmp_path / "o", "--to", "diffusers"],
    ):
        assert run(capsys, *command) == (2, "", expected)
    assert not (tmp_path / "o").exists()


def test_corrupt_header(tmp_path, capsys):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b'{"a": [1, 2, oops]}  ' + b"\0" * 16)
    code, _, err = run(capsys, "inspect", path)
    assert code == 2
    assert err.startswith(f"error: {path} has a corrupt safetensors header: ")

    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    assert run(capsys, "inspect", path) == (
        2,
        "",
        f"error: {path} is not a valid safetensors file (header length 1000000000 for a file of 10 bytes): "
        "corrupt or not a .safetensors file\n",
    )


def test_missing_path(tmp_path, capsys):
    path = tmp_path / "nope.safetensors"
    assert run(capsys, "inspect", path) == (2, "", f"error: no such weight file or folder: {path}\n")


def test_inspect_a_set_folder_reports_each_file(ckpt):
    """A folder of single files without an index json (the official repositories' roots, our random sets)
    is one report per file, not the shards of one model."""
    from weights_tools.inspect import inspect_path

    reports = inspect_path(ckpt)
    assert [(Path(r["path"]).name, r["model"], r["problem"]) for r in reports] == [
        ("ae.safetensors", "ae", None), ("flux1-tiny.safetensors", "transformer", None)]  # fmt: skip


def test_inspect_an_unindexed_shard_folder_reports_one_model(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    from flux_core.files import read_header
    from weights_tools.inspect import inspect_path

    sd = load_file(ckpt / "flux1-tiny.safetensors")
    keys = sorted(sd)
    shards = tmp_path / "shards"
    shards.mkdir()
    meta = read_header(ckpt / "flux1-tiny.safetensors")[2]  # RoPE axes, preset: what shapes do not say
    save_file({k: sd[k] for k in keys[: len(keys) // 2]}, shards / "part-1.safetensors", meta)
    save_file({k: sd[k] for k in keys[len(keys) // 2 :]}, shards / "part-2.safetensors", meta)
    (report,) = inspect_path(shards)
    assert (report["model"], report["num_tensors"], report["problem"]) == ("transformer", len(keys), None)
