"""FLUX.2 loading: presets by family, family detection, official <-> diffusers files and folders, strict
checks with exact messages, meta-device build, fp8, and the refusals of the FLUX.1 side.

Everything runs on the tiny-flux2 preset's random weights (`flux-weights random --preset tiny-flux2`).
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import load_file, save_file

from flux_core import CheckpointError, load_autoencoder, load_flow_model
from flux_core.files import WeightFiles, open_weights, read_header
from flux_core.flux2.autoencoder import AutoEncoder, official_to_diffusers
from flux_core.flux2.formats import bfl_to_diffusers_transformer
from flux_core.flux2.loading import (
    check_flux2_model,
    detect_family,
    load_flux2_autoencoder,
    load_flux2_model,
    read_flux2_params,
)
from flux_core.flux2.model import SIZES, Flux2
from flux_core.flux2.preset import Flux2Preset
from flux_core.flux2.sampling import img_ids, txt_ids
from flux_core.model import Flux
from flux_core.presets import PRESETS, Preset, family_preset, get_preset
from flux_core.runtime.fp8 import Fp8Linear
from weights_tools.random_weights import write_random_checkpoint
from weights_tools.verify import load_inventory

TINY = get_preset("tiny-flux2")
FLUX2_PRESETS = (
    "flux2-dev, flux2-klein-4b, flux2-klein-9b, flux2-klein-base-4b, flux2-klein-base-9b, tiny-flux2, tiny-flux2-dev"
)
FLUX1_PRESETS = "flux-dev, flux-kontext-dev, flux-krea-dev, flux-mini, flux-mini-kontext, flux-schnell, tiny, tiny-kontext"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint("tiny-flux2", tmp_path_factory.mktemp("f2"), seed=0, dtype="float32")


@pytest.fixture(scope="module")
def flux1(tmp_path_factory):
    return write_random_checkpoint(
        "tiny", tmp_path_factory.mktemp("f1"), seed=0, dtype="float32", transformer_only=False
    )


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def forward(model: Flux2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = model.params
    img, txt = torch.randn(1, 4, p.in_channels, generator=g), torch.randn(1, 3, p.context_in_dim, generator=g)
    return model(img, img_ids(1, 2, 2), torch.tensor([0.7]), txt, txt_ids(1, 3), guidance=torch.tensor([4.0]))


# ----------------------------------------------------------------------------------------------
# Presets


def test_presets_share_one_dict_and_carry_their_family():
    assert Preset.family == "flux1" and Flux2Preset.family == "flux2"
    flux2 = sorted(n for n, p in PRESETS.items() if p.family == "flux2")
    assert ", ".join(flux2) == FLUX2_PRESETS
    assert all(isinstance(PRESETS[n], Flux2Preset) for n in flux2)
    dev = get_preset("flux2-dev")
    # official scripts/cli.py: 1360 x 768, 50 steps, guidance 4.0 (embedded: guidance-distilled)
    assert (dev.default_size, dev.default_steps, dev.guidance, dev.default_guidance) == (
        (1360, 768),
        50,
        "embedded",
        4.0,
    )
    assert dev.params == SIZES["flux2-dev"] and dev.text_encoder == "dev"
    for n in ("4b", "9b"):
        distilled, base = get_preset(f"flux2-klein-{n}"), get_preset(f"flux2-klein-base-{n}")
        assert distilled.params == base.params == SIZES[f"flux2-klein-{n}"]  # same tensors
        assert (distilled.default_steps, distilled.guidance) == (4, "none")
        assert (base.default_steps, base.guidance, base.default_guidance) == (50, "cfg", 4.0)
        assert distilled.default_size == base.default_size == (1024, 1024)
        assert distilled.text_encoder == base.text_encoder == "klein"
    # tiny: the real latent format (128 channels, 16 px a token)
    assert TINY.params.in_channels == TINY.ae_params.latent_channels == 128
    assert TINY.ae_params.pixels_per_token == 16


def test_family_preset_refuses_the_other_family():
    assert family_preset("tiny-flux2", "flux2") is TINY
    with pytest.raises(ValueError) as e:
        family_preset("flux2-dev", "flux1", "load_flow_model")
    assert (
        str(e.value)
        == f"preset 'flux2-dev' is a FLUX.2 model; load_flow_model takes FLUX.1 presets: {FLUX1_PRESETS}"
    )
    with pytest.raises(ValueError) as e:
        family_preset("flux3", "flux2")
    assert str(e.value) == f"unknown preset 'flux3'; valid presets: {FLUX2_PRESETS}"


# ----------------------------------------------------------------------------------------------
# Family detection


def test_detect_family_by_keys():
    with torch.device("meta"):
        dev, klein, ae = (
            Flux2(SIZES["flux2-dev"]),
            Flux2(SIZES["flux2-klein-4b"]),
            AutoEncoder(TINY.ae_params),
        )
    for sd in (dev.state_dict(), klein.state_dict(), ae.state_dict()):
        assert detect_family(sd) == "flux2"
    assert detect_family(bfl_to_diffusers_transformer(klein.state_dict())) == "flux2"
    assert detect_family(official_to_diffusers(ae.state_dict())) == "flux2"
    assert detect_family(["model.diffusion_model." + k for k in dev.state_dict()]) == "flux2"
    assert detect_family(load_inventory("flux1-dev")["tensors"]) == "flux1"
    assert detect_family(load_inventory("ae")["tensors"]) == "flux1"
    assert detect_family(["text_model.embeddings.token_embedding.weight"]) is None
    # Without its shared modulations, a FLUX.2 key set reads as FLUX.1: they are the marker.
    blocks = [k for k in klein.state_dict() if k.startswith(("double_blocks.", "single_blocks."))]
    assert detect_family(blocks) == "flux1"


# ----------------------------------------------------------------------------------------------
# Official files


def test_official_files_load_strictly_without_a_preset(ckpt):
    model = load_flux2_model(ckpt.transformer)
    assert model.params == TINY.params == read_flux2_params(ckpt.transformer)
    sd = load_file(ckpt.transformer)
    assert model.state_dict().keys() == sd.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert not any(t.is_meta for t in model.state_dict().values())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ae = load_flux2_autoencoder(ckpt.ae)
    assert ae.params == TINY.ae_params
    assert ae.bn.num_batches_tracked.dtype == torch.int64  # integer buffers keep their dtype
    assert torch.equal(ae.bn.running_var, load_file(ckpt.ae)["bn.running_var"])
    out = ae.decode(ae.encode(torch.zeros(1, 3, 32, 48)))
    assert out.shape == (1, 3, 32, 48) and torch.isfinite(out).all()


def test_preset_and_dtype(ckpt):
    model = load_flux2_model(ckpt.transformer, preset="tiny-flux2", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ae = load_flux2_autoencoder(ckpt.ae, dtype=torch.bfloat16, params=TINY.ae_params)
    assert ae.bn.running_mean.dtype == torch.bfloat16 and ae.bn.num_batches_tracked.dtype == torch.int64


def test_built_on_the_meta_device_then_assigned(ckpt, monkeypatch):
    # No parameter is ever initialised for real: every Linear is created on the meta device, and the
    # file's tensors are assigned (not copied into initialised ones).
    devices = []
    original = torch.nn.Linear.reset_parameters

    def record(self):
        devices.append(self.weight.device.type)
        original(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", record)
    model = load_flux2_model(ckpt.transformer)
    assert devices and set(devices) == {"meta"}
    assert model.img_in.weight.device.type == "cpu"


def test_every_check_before_a_tensor_is_read(ckpt, tmp_path, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(WeightFiles, "bfl_tensors", no_reading)
    monkeypatch.setattr(WeightFiles, "reader", no_reading)
    sd = load_file(ckpt.transformer)
    sd["txt_in.weight"] = torch.zeros(64, 40)
    path = tmp_path / "bad.safetensors"
    save_file(sd, path, metadata=read_header(ckpt.transformer)[2])
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_flux2_model(path, preset="tiny-flux2")
    with pytest.raises(AssertionError, match="a tensor was read"):
        load_flux2_model(ckpt.transformer)  # the checks pass: then the tensors are read


def test_official_prefix_is_accepted(ckpt, tmp_path):
    path = tmp_path / "prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in load_file(ckpt.transformer).items()}, path,
              metadata=read_header(ckpt.transformer)[2])  # fmt: skip
    assert open_weights(path).prefixed
    assert_same_state(load_flux2_model(path), load_flux2_model(ckpt.transformer))


def test_klein_shaped_file_is_inferred(tmp_path):
    import dataclasses

    from flux_core.inference import flux_metadata

    params = dataclasses.replace(TINY.params, guidance_embed=False, depth=2, depth_single_blocks=0)
    torch.manual_seed(0)
    path = tmp_path / "klein.safetensors"
    save_file(Flux2(params).state_dict(), path, metadata=flux_metadata(params))
    assert read_flux2_params(path) == params
    with pytest.raises(CheckpointError) as e:
        load_flux2_model(path, preset="tiny-flux2")
    assert str(e.value) == (
        f"{path} has no guidance_in.* (a [klein]-type model), but preset 'tiny-flux2' is a [dev]-type model; "
        "use a [klein]-type preset or no preset"
    )


# ----------------------------------------------------------------------------------------------
# diffusers files and folders


def diffusers_folder(root: Path, ckpt, shards: int) -> Path:
    """transformer/ in shards named by an index json, and vae/, as diffusers writes a FLUX.2 pipeline."""
    sd = bfl_to_diffusers_transformer(load_file(ckpt.transformer))
    (root / "transformer").mkdir(parents=True)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    keys, weight_map = sorted(sd), {}
    for i, name in enumerate(names):
        part = {k: sd[k].contiguous() for k in keys[i::shards]}
        save_file(part, root / "transformer" / name)
        weight_map |= {k: name for k in part}
    index = root / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    (root / "vae").mkdir()
    vae = {k: v.contiguous() for k, v in official_to_diffusers(load_file(ckpt.ae)).items()}
    save_file(vae, root / "vae" / "diffusion_pytorch_model.safetensors")
    return root


def test_diffusers_folder_round_trip(ckpt, tmp_path):
    folder = diffusers_folder(tmp_path / "pipe", ckpt, shards=3)
    # No metadata in diffusers files: the tiny head dim (32) needs the preset for its RoPE axes.
    with pytest.raises(CheckpointError) as e:
        load_flux2_model(folder)
    assert str(e.value) == (
        f"{folder}: cannot infer the RoPE axes for head dim 32 (only the official 128 = 4 x 32 is known); "
        "pass a preset or record 'fluxspace.axes_dim' in the file's metadata"
    )
    official = load_flux2_model(ckpt.transformer)
    assert_same_state(load_flux2_model(folder, preset="tiny-flux2"), official)
    assert_same_state(load_flux2_autoencoder(folder), load_flux2_autoencoder(ckpt.ae))
    # The files are diffusers' own layout: its classes load them strictly.
    p = TINY.params
    with torch.device("meta"):
        ref = Flux2Transformer2DModel(
            patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
            attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
            mlp_ratio=p.mlp_ratio, axes_dims_rope=p.axes_dim, rope_theta=p.theta, guidance_embeds=p.guidance_embed,
        )  # fmt: skip
    tensors = {}
    for shard in sorted((folder / "transformer").glob("*.safetensors")):
        tensors |= load_file(shard)
    ref.load_state_dict(tensors, strict=True, assign=True)
    a = TINY.ae_params
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(a.ch * m for m in a.ch_mult), layers_per_block=a.num_res_blocks,
        latent_channels=a.z_channels, norm_num_groups=32, sample_size=a.resolution,
    )  # fmt: skip
    vae.load_state_dict(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), strict=True)


# ----------------------------------------------------------------------------------------------
# Refusals: one line naming the problem and what is valid


def test_missing_unexpected_and_misshaped_keys(ckpt, tmp_path):
    sd = load_file(ckpt.transformer)
    del sd["double_blocks.0.img_mlp.2.weight"], sd["single_stream_modulation.lin.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["txt_in.weight"] = torch.zeros(64, 40)
    path = tmp_path / "broken.safetensors"
    save_file(sd, path, metadata=read_header(ckpt.transformer)[2])
    with pytest.raises(CheckpointError) as e:
        load_flux2_model(path, preset="tiny-flux2")
    assert str(e.value) == (
        f"{path} does not match tiny-flux2: 2 missing: double_blocks.0.img_mlp.2.weight, "
        "single_stream_modulation.lin.weight; 1 unexpected: extra.weight; "
        "1 mis-shaped: txt_in.weight (64, 40) != (64, 48)"
    )
    del sd["img_in.weight"]
    save_file(sd, path, metadata=read_header(ckpt.transformer)[2])
    with pytest.raises(CheckpointError) as e:
        load_flux2_model(path)
    assert str(e.value) == f"{path}: cannot infer the FLUX.2 transformer's shape: 1 missing: img_in.weight"


def test_wrong_family_and_wrong_model_are_named(ckpt, flux1):
    with pytest.raises(CheckpointError) as e:
        load_flux2_model(flux1.transformer)
    assert str(e.value) == (
        f"{flux1.transformer} holds a FLUX.1 transformer, not a FLUX.2 one: load it with load_flow_model "
        f"(or with a FLUX.1 preset: {FLUX1_PRESETS})"
    )
    with pytest.raises(CheckpointError) as e:
        load_flow_model(ckpt.transformer)
    assert str(e.value) == (
        f"{ckpt.transformer} holds a FLUX.2 transformer, not a FLUX.1 one: load it with load_flux2_model "
        f"(or with a FLUX.2 preset: {FLUX2_PRESETS})"
    )
    with pytest.raises(
        CheckpointError, match=r"holds a FLUX.1 autoencoder, not a FLUX.2 one: load it with load_autoencoder"
    ):
        load_flux2_autoencoder(flux1.ae)
    with pytest.raises(
        CheckpointError,
        match=r"holds a FLUX.2 autoencoder, not a FLUX.1 one: load it with load_flux2_autoencoder",
    ):
        load_autoencoder(ckpt.ae)
    with pytest.raises(CheckpointError) as e:
        load_flux2_model(ckpt.ae)
    assert (
        str(e.value)
        == f"{ckpt.ae} is not a FLUX.2 transformer (it looks like an autoencoder: use load_flux2_autoencoder)"
    )
    with pytest.raises(ValueError) as e:
        load_flux2_model(ckpt.transformer, preset="tiny")
    assert (
        str(e.value)
        == f"preset 'tiny' is a FLUX.1 model; load_flux2_model takes FLUX.2 presets: {FLUX2_PRESETS}"
    )
    with pytest.raises(
        ValueError, match="preset 'tiny-flux2' is a FLUX.2 model; load_flow_model takes FLUX.1 presets"
    ):
        load_flow_model(flux1.transformer, preset="tiny-flux2")


def test_bad_rope_metadata(ckpt, tmp_path):
    path = tmp_path / "axes.safetensors"
    save_file(load_file(ckpt.transformer), path, metadata={"fluxspace.axes_dim": "[8, 8, 16]"})
    with pytest.raises(CheckpointError) as e:
        load_flux2_model(path)
    assert (
        str(e.value)
        == f"{path}: metadata 'fluxspace.axes_dim' [8, 8, 16] has 3 axes; this model's position ids have 4"
    )


def test_truncated_file(ckpt, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(ckpt.transformer.read_bytes()[:-10])
    with pytest.raises(
        CheckpointError, match=r"is truncated: its header describes \d+ bytes but the file has \d+"
    ):
        load_flux2_model(path)


# ----------------------------------------------------------------------------------------------
# fp8, as for FLUX.1 (runtime/fp8.py)


def test_fp8_weights(ckpt):
    full = load_flux2_model(ckpt.transformer)
    fp8 = load_flux2_model(ckpt.transformer, weights="fp8")
    linears = {n for n, m in fp8.named_modules() if isinstance(m, Fp8Linear)}
    assert "double_blocks.0.img_attn.qkv" in linears and "single_blocks.1.linear2" in linears
    assert not any(
        n.startswith(("img_in", "txt_in", "double_stream_modulation", "final_layer")) for n in linears
    )
    assert fp8.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    a, b = forward(full), forward(fp8)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.05


def test_check_flux2_model_reads_headers_only(ckpt):
    assert check_flux2_model(open_weights(ckpt.transformer), "tiny-flux2") == TINY.params


def test_flux1_model_class_is_untouched(flux1):
    assert isinstance(load_flow_model(flux1.transformer), Flux)
