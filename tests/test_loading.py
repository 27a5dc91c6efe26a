"""Loading: strict, shape inference, variant checks, diffusers folders, and clear errors."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_core import CheckpointError, Flux, get_preset, load_autoencoder, load_flow_model
from flux_core.files import read_header
from flux_core.formats import bfl_to_diffusers_ae, bfl_to_diffusers_transformer
from flux_core.inference import flux_metadata, flux_params_from_shapes
from flux_core.loading import read_flux_params


def test_loads_without_a_preset_and_infers_the_shape(tiny_checkpoint):
    model = load_flow_model(tiny_checkpoint.transformer)
    assert model.params == get_preset("tiny").params
    assert not any(p.requires_grad for p in model.parameters())
    sd = load_file(tiny_checkpoint.transformer)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_loads_with_the_matching_preset_and_in_bf16(tiny_checkpoint):
    model = load_flow_model(tiny_checkpoint.transformer, preset="tiny", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_refuses_a_preset_that_contradicts_the_file(tiny_checkpoint, tmp_path):
    # The tiny file is dev-type (guidance_in); a schnell-type preset must be refused, naming what was found.
    with pytest.raises(CheckpointError, match=r"has guidance_in\.\* \(a dev-type model\), but preset 'flux-schnell' is a schnell-type"):
        load_flow_model(tiny_checkpoint.transformer, preset="flux-schnell")
    # A dev preset of another shape: the mis-shaped keys are listed.
    with pytest.raises(CheckpointError, match=r"does not match flux-dev: 720 missing: .*; 59 mis-shaped: double_blocks.0.img_attn.norm.key_norm.scale \(32,\) != \(128,\)"):
        load_flow_model(tiny_checkpoint.transformer, preset="flux-dev")


def test_unknown_preset_lists_valid_ones(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"unknown preset 'flux-pro'; valid presets: flux-dev, flux-kontext-dev, flux-krea-dev, flux-mini, flux-mini-kontext, flux-schnell, tiny, tiny-kontext"):
        load_flow_model(tiny_checkpoint.transformer, preset="flux-pro")


def test_official_prefix_is_accepted(tiny_checkpoint, tmp_path):
    sd = load_file(tiny_checkpoint.transformer)
    path = tmp_path / "prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, path, metadata=read_header(tiny_checkpoint.transformer)[2])
    model = load_flow_model(path)
    assert torch.equal(model.img_in.weight, sd["img_in.weight"])


def test_pruned_model_loads_by_inference(tmp_path):
    # A community-style pruned model: official width, fewer blocks, no metadata (head dim 128 -> official RoPE).
    params = dataclasses.replace(get_preset("flux-schnell").params, depth=1, depth_single_blocks=1)
    shapes = {}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(params).state_dict().items()}
    assert flux_params_from_shapes(shapes) == params


def test_missing_keys_are_listed(tiny_checkpoint, tmp_path):
    sd = load_file(tiny_checkpoint.transformer)
    del sd["final_layer.linear.bias"], sd["double_blocks.0.txt_mlp.2.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(sd, path, metadata=read_header(tiny_checkpoint.transformer)[2])
    with pytest.raises(CheckpointError) as e:
        load_flow_model(path)
    msg = str(e.value)
    assert "2 missing: double_blocks.0.txt_mlp.2.weight, final_layer.linear.bias" in msg
    assert "1 unexpected: extra.weight" in msg


def test_truncated_and_corrupt_files(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.transformer.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors is truncated: its header describes \d+ bytes but the file has \d+"):
        load_flow_model(truncated)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="has a corrupt safetensors header"):
        load_flow_model(corrupt)
    not_st = tmp_path / "notes.safetensors"
    not_st.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="is not a safetensors file: only 5 bytes"):
        load_flow_model(not_st)
    with pytest.raises(CheckpointError, match="no such weight file or folder"):
        load_flow_model(tmp_path / "absent.safetensors")


def test_wrong_model_files_are_named(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"is not a Flux transformer \(it looks like an autoencoder: use load_autoencoder\)"):
        load_flow_model(tiny_checkpoint.ae)
    with pytest.raises(CheckpointError, match=r"is not a Flux autoencoder \(it looks like a Flux transformer: use load_flow_model\)"):
        load_autoencoder(tiny_checkpoint.transformer)


def test_autoencoder_shape_and_scale_are_inferred(tiny_checkpoint):
    ae = load_autoencoder(tiny_checkpoint.ae)
    assert ae.params == get_preset("tiny").ae_params
    z = ae.encode(torch.zeros(1, 3, 64, 64))
    assert z.shape == (1, 16, 8, 8)


def write_diffusers_folder(root, tiny_checkpoint, shards: int, metadata: dict | None = None):
    """transformer/ (sharded with an index json when shards > 1) and vae/, as diffusers lays them out.

    metadata: written into every transformer shard (diffusers writes none)."""
    sd = bfl_to_diffusers_transformer(load_file(tiny_checkpoint.transformer))
    (root / "transformer").mkdir(parents=True)
    keys = sorted(sd)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: sd[k].contiguous() for k in keys[i::shards]}
        save_file(part, root / "transformer" / name, metadata=metadata)
        weight_map.update({k: name for k in part})
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "vae").mkdir()
    save_file({k: v.contiguous() for k, v in bfl_to_diffusers_ae(load_file(tiny_checkpoint.ae)).items()},
              root / "vae" / "diffusion_pytorch_model.safetensors")  # fmt: skip
    return root


def test_diffusers_folder_is_converted_on_load(tiny_checkpoint, tmp_path):
    folder = write_diffusers_folder(tmp_path / "diffusers", tiny_checkpoint, shards=3)
    # No metadata in a diffusers file: the tiny head dim (32) needs the preset for its RoPE axes.
    with pytest.raises(CheckpointError, match="cannot infer the RoPE axes for head dim 32"):
        load_flow_model(folder)
    model = load_flow_model(folder, preset="tiny")
    ref = load_flow_model(tiny_checkpoint.transformer)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    ae = load_autoencoder(folder)
    ref_ae = load_autoencoder(tiny_checkpoint.ae)
    for (k, a), (_, b) in zip(ae.state_dict().items(), ref_ae.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_read_flux_params_equals_the_loaded_models(tiny_checkpoint, tmp_path):
    assert read_flux_params(tiny_checkpoint.transformer) == load_flow_model(tiny_checkpoint.transformer).params
    # A diffusers folder: read from the shards' headers; without our metadata the tiny RoPE axes are
    # unknown, as for the loader.
    folder = write_diffusers_folder(tmp_path / "plain", tiny_checkpoint, shards=2)
    with pytest.raises(CheckpointError, match="cannot infer the RoPE axes for head dim 32"):
        read_flux_params(folder)
    metadata = read_header(tiny_checkpoint.transformer)[2]
    folder = write_diffusers_folder(tmp_path / "with-metadata", tiny_checkpoint, shards=2, metadata=metadata)
    assert read_flux_params(folder) == load_flow_model(folder).params == get_preset("tiny").params
    with pytest.raises(CheckpointError, match=r"is not a Flux transformer \(it looks like an autoencoder"):
        read_flux_params(tiny_checkpoint.ae)


def test_metadata_round_trip():
    p = get_preset("tiny").params
    meta = flux_metadata(p, "tiny")
    assert json.loads(meta["fluxspace.axes_dim"]) == list(p.axes_dim)


def test_loading_copies_nothing_twice(tiny_checkpoint, tmp_path):
    # bf16 file loaded as bf16: the parameters are the tensors read from the file, no float32 detour.
    sd = load_file(tiny_checkpoint.transformer)
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, path, metadata=read_header(tiny_checkpoint.transformer)[2])
    model = load_flow_model(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_single_diffusers_layout_file_loads(tiny_checkpoint, tmp_path):
    path = tmp_path / "diffusers-transformer.safetensors"
    save_file(bfl_to_diffusers_transformer(load_file(tiny_checkpoint.transformer)), path)
    model = load_flow_model(path, preset="tiny")
    assert torch.equal(model.img_in.weight, load_file(tiny_checkpoint.transformer)["img_in.weight"])
    ae_path = tmp_path / "diffusers-vae.safetensors"
    save_file({k: v.contiguous() for k, v in bfl_to_diffusers_ae(load_file(tiny_checkpoint.ae)).items()}, ae_path)
    assert load_autoencoder(ae_path).params.ch == get_preset("tiny").ae_params.ch
