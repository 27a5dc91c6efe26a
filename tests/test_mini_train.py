"""flux-mini training (fluxspace/mini/train*.py, data.py, build.py): the losses fall, resume is exact,
and a tiny build writes a folder the ordinary loaders read and sample from."""

import json

import numpy as np
import pytest
import torch

from flux_core import load_flow_model
from flux_core.autoencoder import AutoEncoderParams
from flux_core.conditioner import TEXT_ENCODER_FOLDERS
from flux_core.model import FluxParams
from flux_core.presets import get_preset
from fluxspace import SampleSettings, generate, load_models
from fluxspace.mini.build import BuildConfig, build, folder_size, load_encoded, parse_restarts, save_encoded
from fluxspace.mini.checkpoint import load_checkpoint
from fluxspace.mini.data import cached_faces, caption_sets, make_faces
from fluxspace.mini.train import CHECKPOINT, LOG, TrainConfig, learning_rate
from fluxspace.mini.train_ae import train_autoencoder
from fluxspace.mini.train_flow import CaptionBank, train_flow

# Small stand-ins for the flux-mini configs, so that 30 steps take a second or two.
SMALL_AE = AutoEncoderParams(
    resolution=32, in_channels=3, ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, z_channels=16,
    scale_factor=1.0, shift_factor=0.0,
)  # fmt: skip
SMALL_FLUX = FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=16, hidden_size=64, mlp_ratio=2.0,
    num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(8, 12, 12), theta=10_000, qkv_bias=True,
    guidance_embed=False,
)  # fmt: skip


def logged(folder, key="loss"):
    return [json.loads(line)[key] for line in (folder / LOG).read_text().splitlines()]


def flow_data(n=4, k=2, tokens=8):
    """A fixed handful of latents (4 image tokens each) and a caption bank of random features.

    Like the latents of faces, they share a layout (one pattern, plus variation per image), which is
    what a few steps can learn; independent random latents would need many steps to memorise.
    """
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 4, 4, generator=g) + 0.3 * torch.randn(n, 16, 4, 4, generator=g)
    rows = 1 + n * k  # row 0: the empty prompt
    bank = CaptionBank(
        txt=torch.randn(rows, tokens, 16, generator=g).bfloat16(),
        vec=torch.randn(rows, 16, generator=g).bfloat16(),
        ids=torch.arange(1, rows).reshape(n, k),
        captions=tuple(f"caption {i}" for i in range(rows)),
    )
    return latents, bank


def test_learning_rate_warms_up_then_decays_to_the_floor():
    c = TrainConfig(steps=100, batch_size=1, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, c) == pytest.approx(0.1)
    assert learning_rate(9, c) == pytest.approx(1.0)
    assert learning_rate(55, c) == pytest.approx(0.55)  # half way through the cosine
    assert learning_rate(100, c) == pytest.approx(0.1)


def test_faces_and_captions_are_deterministic_by_seed(tmp_path):
    a, b = make_faces(3, seed=5, size=32), make_faces(3, seed=5, size=32)
    assert np.array_equal(a.images, b.images) and a.attrs == b.attrs
    assert not np.array_equal(a.images, make_faces(3, seed=6, size=32).images)
    saved = cached_faces(tmp_path / "faces.npz", 3, seed=5, size=32)
    again = cached_faces(tmp_path / "faces.npz", 3, seed=5, size=32)
    assert np.array_equal(saved.images, a.images) and again.attrs == a.attrs and again.seeds == a.seeds
    captions = caption_sets(a.attrs, k=3, seed=5)
    assert captions == caption_sets(a.attrs, k=3, seed=5) and [len(c) for c in captions] == [3, 3, 3]


def test_autoencoder_loss_falls(tmp_path):
    faces = make_faces(4, seed=0, size=32)
    config = TrainConfig(steps=30, batch_size=4, lr=1e-3, log_every=1)
    run = train_autoencoder(faces, SMALL_AE, config, tmp_path, progress=False)
    losses = logged(tmp_path)
    assert run.finished and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_flow_loss_falls(tmp_path):
    latents, bank = flow_data()
    config = TrainConfig(steps=60, batch_size=8, lr=3e-3, log_every=1)
    train_flow(latents, bank, SMALL_FLUX, config, tmp_path, progress=False)
    losses = logged(tmp_path)
    # adaLN-Zero: the fresh model predicts v = 0, so the first loss is E|eps - x0|^2, about 2.
    assert 1.5 < losses[0] < 2.5
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:5]), losses


def test_resume_is_bit_identical(tmp_path):
    latents, bank = flow_data()
    config = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, log_every=1)
    whole = train_flow(latents, bank, SMALL_FLUX, config, tmp_path / "whole", progress=False)
    half = train_flow(latents, bank, SMALL_FLUX, config, tmp_path / "split", stop_at=3, progress=False)
    assert (half.step, half.finished) == (3, False)
    rest = train_flow(latents, bank, SMALL_FLUX, config, tmp_path / "split", resume=True, progress=False)
    assert (rest.step, rest.finished) == (6, True)

    a = load_checkpoint(tmp_path / "whole" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(moments_a[i][m], moments_b[i][m]) for i in moments_a for m in moments_a[i])
    assert torch.equal(a["generator"], b["generator"]) and a["step"] == b["step"] == 6
    assert logged(tmp_path / "whole") == logged(tmp_path / "split")
    assert all(torch.equal(p, q) for p, q in zip(whole.ema.parameters(), rest.ema.parameters(), strict=True))
    seconds = logged(tmp_path / "split", "seconds")  # training time counts on across the resume
    # (the log rounds to the millisecond: the checkpoint's exact time, taken after it, can be up to 0.5 ms below)
    assert seconds == sorted(seconds) and b["seconds"] >= seconds[-1] - 0.0005 and seconds[-1] > 0

    # Resuming a finished run trains nothing and reports the run's last logged loss.
    again = train_flow(latents, bank, SMALL_FLUX, config, tmp_path / "split", resume=True, progress=False)
    assert (again.step, again.loss) == (6, whole.loss) and not np.isnan(again.loss)
    assert logged(tmp_path / "split") == logged(tmp_path / "whole")


def test_encoded_cache_round_trips(tmp_path):
    latents, bank = flow_data()
    save_encoded(tmp_path / "encoded.safetensors", latents, bank)
    again, bank_again = load_encoded(tmp_path / "encoded.safetensors")
    assert torch.equal(again, latents) and bank_again.captions == bank.captions
    assert all(torch.equal(getattr(bank_again, k), getattr(bank, k)) for k in ("txt", "vec", "ids"))
    assert bank_again.txt.dtype == torch.bfloat16 and bank_again.ids.dtype == torch.int64


def test_second_stage_starts_from_the_given_weights(tmp_path):
    latents, bank = flow_data()
    first = train_flow(latents, bank, SMALL_FLUX, TrainConfig(steps=3, batch_size=4, lr=1e-3), tmp_path / "a", progress=False)
    init = {"model": first.model.state_dict(), "ema": first.ema.state_dict()}
    # lr 0: the optimizer moves nothing, so the second stage ends where the first one did.
    second = train_flow(latents, bank, SMALL_FLUX, TrainConfig(steps=1, batch_size=4, lr=0.0, ema_decay=0.0),
                        tmp_path / "b", progress=False, init=init)  # fmt: skip
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fresh = train_flow(latents, bank, SMALL_FLUX, TrainConfig(steps=1, batch_size=4, lr=0.0), tmp_path / "c", progress=False)
    assert not torch.equal(fresh.model.img_in.weight, first.model.img_in.weight)


def test_resume_refuses_other_settings(tmp_path):
    latents, bank = flow_data()
    config = TrainConfig(steps=4, batch_size=4, lr=1e-3)
    train_flow(latents, bank, SMALL_FLUX, config, tmp_path, stop_at=2, progress=False)
    other = TrainConfig(steps=4, batch_size=4, lr=2e-3)
    with pytest.raises(ValueError, match=r"cannot resume .*lr: 0.001 -> 0.002"):
        train_flow(latents, bank, SMALL_FLUX, other, tmp_path, resume=True, progress=False)


def test_tiny_build_loads_and_samples(tmp_path):
    out = tmp_path / "flux-mini"
    config = BuildConfig(
        out=out, work=tmp_path / "work", steps_ae=2, steps_flow=2, batch_ae=2, batch_flow=4, images=8,
        captions_per_image=2, eval_images=4, stats_images=8, corpus_size=200, progress=False, flow_restarts=((2, 1e-3), (1, 1e-3)),
    )  # fmt: skip
    # A time limit of 0 stops after the first step of the first stage; --resume finishes the build.
    stopped = build(BuildConfig(**{**vars(config), "time_limit": 0.0}))
    assert not stopped["complete"] and stopped["ae_steps"] == 1
    report = build(BuildConfig(**{**vars(config), "resume": True}))
    assert report["complete"] and (report["ae_steps"], report["flow_steps"], report["flow_restart_steps"]) == (2, 2, [2, 1])
    # The resumed report keeps the first run's stage seconds (the build's wall time is their sum).
    assert report["earlier_runs"] == [stopped["seconds"]] and "autoencoder" in stopped["seconds"]
    assert json.loads((tmp_path / "work" / "build.json").read_text()) == report

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["ae.safetensors", "flux-mini.safetensors", *TEXT_ENCODER_FOLDERS])
    assert folder_size(out) <= 30_000_000
    preset = get_preset("flux-mini")
    flow = load_flow_model(out / "flux-mini.safetensors")  # no preset: shape and RoPE from the file
    assert flow.params == preset.params
    assert next(iter(load_checkpoint(tmp_path / "work" / "flow" / CHECKPOINT)["ema"].values())).dtype == torch.float32

    models = load_models(out)
    assert models.preset.name == "flux-mini"
    assert models.ae.params.scale_factor == pytest.approx(report["scale_factor"])
    assert models.ae.params.shift_factor == pytest.approx(report["shift_factor"])
    settings = SampleSettings(steps=2)  # the preset's size (64 px) and true-CFG scale
    images = generate(models, ["a sketch of a person with a hat", ""], [0, 1], settings, progress=False)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert all(np.isfinite(np.asarray(im, dtype=np.float32)).all() for im in images)


def test_flow_restarts_parse_and_reject_bad_input():
    assert parse_restarts("6000:4e-4,3000:2e-4") == ((6000, 4e-4), (3000, 2e-4))
    assert parse_restarts("none") == parse_restarts("") == ()
    with pytest.raises(ValueError, match=r"^bad flow restart '3000': expected STEPS:LR, e.g. 6000:4e-4 \(or 'none'\)$"):
        parse_restarts("6000:4e-4,3000")
    with pytest.raises(ValueError, match=r"^bad flow restart '0:1e-4': steps and lr must be positive$"):
        parse_restarts("0:1e-4")
