"""Offload modes and staged loading (fluxspace/runtime.py, flux_core/offload.py), on the CPU.

On the CPU the "device" and the storage are both host memory, so a move is a no-op; the moves are
counted all the same, and the tests read the counts and the runtime's state from inside the model
(an edit on the seam sees which parts and block groups are on their device while each block runs).
Every mode must give the images of the plain, resident model bit for bit.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_inputs, tiny_model

from flux_core.offload import Mover, StreamedBlocks, stream_blocks, unstream_blocks
from flux_core.recorder import Recorder
from flux_core.seam import ModVectors
from fluxspace import Concept, EditSpec, SampleSettings, SamplingRun, edit_image, generate, load_models
from fluxspace.cli import main
from fluxspace.images import read_png_params
from fluxspace.inversion import invert_image
from fluxspace.runtime import Residency

CFG = SampleSettings(width=64, height=48, steps=3, cfg_scale=2.0, negative_prompt="blurry")
SETTINGS = SampleSettings(width=64, height=48, steps=3)
MODES = {
    "model": Residency(offload="model"),
    "model, text on the cpu": Residency(offload="model", text_device="cpu"),
    "blocks": Residency(offload="blocks", block_group=1, cpu_streaming=True),
    "staged": Residency(staged=True),
    "staged blocks": Residency(offload="blocks", staged=True, block_group=2, cpu_streaming=True),
}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.fixture(scope="module")
def resident(tiny_checkpoint):
    return load_models(tiny_checkpoint.transformer)


def load(tiny_checkpoint, residency: Residency):
    return load_models(tiny_checkpoint.transformer, residency=residency)


class Probe:
    """An edit schedule that changes nothing and notes, at every block, what the runtime holds."""

    def __init__(self, models):
        self.runtime, self.seen = models.runtime, []

    def at_step(self, step, t, num_steps):
        return self

    def vectors(self, model, vec, timesteps, y, guidance):
        return ModVectors(img=vec, txt=vec, out=vec)

    def _note(self, kind, site):
        rt = self.runtime
        streamers = rt.streamers.get("flow", [])
        groups = streamers[0].resident if streamers else None
        self.seen.append({"block": (kind, site.index), "running": rt.running, "text": rt.is_loaded("text"),
                          "text_in": rt.mover.is_in("text"), "flow_in": rt.mover.is_in("flow"), "groups": groups})  # fmt: skip

    def double_block(self, site):
        self._note("double", site)
        return site.outputs()

    def single_block(self, site):
        self._note("single", site)
        return site.attention()


# ------------------------------------------------------------------------------- the block streamer


@pytest.mark.parametrize("group_size", [1, 2, 3, 5])
def test_streamed_blocks_are_the_plain_forward_bit_for_bit(group_size):
    model = tiny_model(depth=3, single=2)
    inp = tiny_inputs(model)
    with torch.inference_mode():
        plain = model(**inp)
        recorded_plain = Recorder(keep=("img_attn_out", "attn"))
        model(**inp, edit=recorded_plain)
    keys = list(model.state_dict())
    mover = Mover("cpu")
    streamer = stream_blocks(model, group_size, mover, "cpu")
    assert isinstance(model.double_blocks, StreamedBlocks) and list(model.state_dict()) == keys
    seen = []

    class Check(Recorder):  # the recorder, plus which groups are on the device at each block
        def double_block(self, site):
            seen.append((site.index // group_size, set(streamer.resident)))
            return super().double_block(site)

        def single_block(self, site):
            seen.append(((3 + site.index) // group_size, set(streamer.resident)))
            return super().single_block(site)

    with torch.inference_mode():
        streamed = model(**inp)
        check = Check(keep=("img_attn_out", "attn"))
        again = model(**inp, edit=check)
    assert torch.equal(plain, streamed) and torch.equal(plain, again)
    for a, b in zip(recorded_plain.entries, check.entries, strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    n_groups = -(-5 // group_size)
    for group, resident in seen:
        assert group in resident and len(resident) <= 2  # the running group, and the next one prefetched
        assert resident <= {group, (group + 1) % n_groups}
    # Each of the two forwards brings every group in once, and the last group prefetches group 0 for the
    # next forward; with one or two groups everything stays on the device.
    ins = [mover.moves[(f"blocks.{g}", "in")] for g in range(n_groups)]
    assert ins == ([1] * n_groups if n_groups <= 2 else [3] + [2] * (n_groups - 1))
    streamer.release()
    outs = [mover.moves[(f"blocks.{g}", "out")] for g in range(n_groups)]
    assert streamer.resident == set() and outs == ins
    unstream_blocks(model)
    assert type(model.double_blocks) is torch.nn.ModuleList


# ------------------------------------------------------------------------------- same images in every mode


@pytest.mark.parametrize("mode", MODES)
def test_generate_with_true_cfg_is_the_same_in_every_mode(tiny_checkpoint, resident, mode):
    expected = generate(resident, ["a red bicycle"], [3], CFG, progress=False)
    models = load(tiny_checkpoint, MODES[mode])
    got = generate(models, ["a red bicycle"], [3], CFG, progress=False)
    assert np.array_equal(pixels(expected[0]), pixels(got[0]))
    again = generate(models, ["a red bicycle"], [3], CFG, progress=False)  # parts come back for a second run
    assert np.array_equal(pixels(expected[0]), pixels(again[0]))


EDIT = EditSpec(concepts=(Concept("glasses", 4.0, 0.5), Concept("red hat", -2.0, 0.0)), lambda_coarse=0.4,
                coarse_prompt="glasses", prior_prompt="a face", start=1)  # fmt: skip


@pytest.mark.parametrize("mode", ["model", "blocks", "staged blocks"])
def test_fluxspace_edit_with_masks_coarse_and_recorder_is_the_same_in_every_mode(tiny_checkpoint, resident, mode):
    expected = edit_image(resident, "a smiling woman", EDIT, seed=5, settings=SETTINGS, record=True, progress=False)
    models = load(tiny_checkpoint, MODES[mode])
    got = edit_image(models, "a smiling woman", EDIT, seed=5, settings=SETTINGS, record=True, progress=False)
    assert np.array_equal(pixels(expected.original), pixels(got.original))
    assert np.array_equal(pixels(expected.edited), pixels(got.edited))
    assert all(torch.equal(a, b) for a, b in zip(expected.masks, got.masks, strict=True))
    assert len(expected.recorder.entries) == len(got.recorder.entries) > 0
    for a, b in zip(expected.recorder.entries, got.recorder.entries, strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("mode", ["model", "blocks", "staged"])
def test_inversion_and_real_image_edit_are_the_same_in_every_mode(tiny_checkpoint, resident, mode):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    spec = EditSpec(concepts=(Concept("glasses", 3.0),))
    kw = dict(settings=SampleSettings(steps=2), edit_spec=spec, edit_prompt="a photo, glasses")
    expected = invert_image(resident, photo, "a photo", **kw)
    got = invert_image(load(tiny_checkpoint, MODES[mode]), photo, "a photo", **kw)
    assert torch.equal(expected.noise, got.noise)
    assert np.array_equal(pixels(expected.reconstruction), pixels(got.reconstruction))
    assert np.array_equal(pixels(expected.edited), pixels(got.edited))


# ------------------------------------------------------------------------------- what moves when


def run_with_probe(models, settings=CFG):
    """generate's steps, with the probe inside every forward; returns the probe."""
    run = SamplingRun.prepare(models, ["a cat"], [1], settings, progress=False)
    probe = Probe(models)
    run.decode(run.sample(run.inp.img, velocity=run.velocity(probe)))
    return probe


def test_model_offload_moves_each_part_in_only_while_it_runs(tiny_checkpoint):
    models = load(tiny_checkpoint, MODES["model"])
    assert models.runtime.mover.log == []  # loaded into host memory; nothing on the device yet
    probe = run_with_probe(models)
    # The text encoders ran (prompt and negative), went back, then the transformer ran every step, then the AE.
    assert models.runtime.mover.log == [("text", "in"), ("text", "out"), ("flow", "in"), ("flow", "out"), ("ae", "in")]
    assert len(probe.seen) == 3 * 3  # 3 steps x 3 blocks
    assert all(s["running"] == "flow" and s["flow_in"] and not s["text_in"] for s in probe.seen)
    models.runtime.release()
    assert models.runtime.mover.log[-1] == ("ae", "out") and models.runtime.running is None


def test_blocks_offload_streams_groups_while_the_transformer_runs(tiny_checkpoint):
    models = load(tiny_checkpoint, MODES["blocks"])
    probe = run_with_probe(models)
    groups = [s["groups"] for s in probe.seen]
    order = [0, 1, 2] * 3  # tiny: 1 double + 2 single blocks, one block a group
    assert all(g in resident and len(resident) <= 2 for g, resident in zip(order, groups, strict=True))
    moves = models.runtime.mover.moves
    # Once per step; group 0 also once more: the last group of each forward prefetches it for the next.
    assert [moves[(f"flow.blocks.{g}", "in")] for g in range(3)] == [4, 3, 3]
    assert moves[("flow", "in")] == 1  # the rest of the transformer stays for the whole run
    # T5's blocks were streamed too, while the text encoders ran.
    assert moves[("text.blocks.0", "in")] >= 1 and moves[("text", "in")] == 1
    assert not any(name.startswith("flow.blocks") for name, _ in models.runtime.mover.log[-2:])  # AE ran alone


def test_staged_run_frees_the_text_encoders_before_the_transformer_runs(tiny_checkpoint):
    models = load(tiny_checkpoint, MODES["staged"])
    rt = models.runtime
    assert not any(rt.is_loaded(p) for p in ("text", "flow", "ae"))  # only the headers were read
    probe = run_with_probe(models)
    assert all(s["running"] == "flow" and not s["text"] for s in probe.seen)
    assert rt.loads == {"text": 1, "flow": 1, "ae": 1} and not rt.is_loaded("flow") and rt.is_loaded("ae")
    run_with_probe(models)  # a second run reads each part again, one at a time
    assert rt.loads == {"text": 2, "flow": 2, "ae": 2}


def test_text_encoders_on_the_cpu_stay_there(tiny_checkpoint, resident):
    models = load(tiny_checkpoint, Residency(text_device="cpu"))
    expected = generate(resident, ["a dog"], [2], CFG, progress=False)
    assert np.array_equal(pixels(expected[0]), pixels(generate(models, ["a dog"], [2], CFG, progress=False)[0]))
    assert models.runtime.mover.log == [] and next(models.text.parameters()).device.type == "cpu"


# ------------------------------------------------------------------------------- refusals, CLI, metadata


def test_impossible_modes_are_refused_in_one_line(tiny_checkpoint):
    path = tiny_checkpoint.transformer
    with pytest.raises(ValueError, match=r"^offload 'blocks' streams the transformer's blocks to a CUDA GPU .*the "
                                         r"device is cpu: use offload 'model' or 'none'$"):  # fmt: skip
        load_models(path, offload="blocks")
    with pytest.raises(ValueError, match=r"^unknown offload mode 'disk'; valid: none, model, blocks$"):
        load_models(path, offload="disk")
    with pytest.raises(ValueError, match=r"^text device 'banana' is not a device; valid: cpu, cuda, cuda:N, mps$"):
        load_models(path, text_device="banana")
    with pytest.raises(ValueError, match="either residency= or offload="):
        load_models(path, offload="model", residency=Residency())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--offload", "blocks"], "fluxspace: error: offload 'blocks' streams the transformer's blocks to a CUDA GPU"),
        (["--text-device", "banana"], "fluxspace: error: --text-device 'banana' is not a device; valid: cpu, cuda"),
        (["--offload", "disk"], "fluxspace generate: error: argument --offload: invalid choice: 'disk' (choose from 'none', 'model', 'blocks')"),
    ],
)
def test_cli_refuses_in_one_line(tiny_checkpoint, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--model", str(tiny_checkpoint.transformer), "--out", str(tmp_path / "x.png"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_cli_records_offload_and_gives_the_same_image(tiny_checkpoint, tmp_path):
    small = ["--model", str(tiny_checkpoint.transformer), "--width", "64", "--height", "48", "--steps", "2", "--quiet"]
    main(["generate", "a red bicycle", "--out", str(tmp_path / "plain.png"), *small])
    main(["generate", "a red bicycle", "--out", str(tmp_path / "off.png"), "--offload", "model", "--text-device", "cpu",
          "--staged", *small])  # fmt: skip
    assert np.array_equal(pixels(Image.open(tmp_path / "plain.png")), pixels(Image.open(tmp_path / "off.png")))
    plain, off = read_png_params(tmp_path / "plain.png"), read_png_params(tmp_path / "off.png")
    assert (plain["offload"], plain["text_device"], plain["staged"]) == ("none", None, False)
    assert (off["offload"], off["text_device"], off["staged"]) == ("model", "cpu", True)
    out = tmp_path / "edit"
    assert main(["edit", "a man", "--edit", "glasses", "--offload", "model", "--out-dir", str(out), *small]) == 0
    assert read_png_params(out / "edited.png")["offload"] == "model"


def test_flux2_llm_layers_stream_under_blocks(tmp_path):
    """FLUX.2's LLM (transformers' decoder iterates `layers[: num_hidden_layers]`, a slice of the whole
    list) streams its layers like T5's blocks: the same text features, two groups on the device at most,
    and the memory estimate counts two groups of layers, not the whole LLM."""
    from fluxspace.models import resolve_paths
    from fluxspace.resources import part_weights, text_layer_weights
    from fluxspace.runtime import resident_bytes
    from weights_tools.cli import main as weights_main

    assert weights_main(["random", "--preset", "tiny-flux2", "--out", str(tmp_path), "--dtype", "float32"]) == 0
    plain = load_models(tmp_path)
    streamed = load_models(tmp_path, residency=Residency(offload="blocks", block_group=4, cpu_streaming=True))
    prompts = ["a portrait of a woman with red hair", "a cat"]
    assert torch.equal(streamed.text(prompts), plain.text(prompts))
    layers = streamed.text.model.layers
    assert isinstance(layers, StreamedBlocks) and len(layers) == 27
    moves = streamed.runtime.mover.moves
    assert [moves[(f"text.blocks.{g}", "in")] for g in range(7)] == [2, 1, 1, 1, 1, 1, 1]  # 27 layers, 4 a group
    assert streamed.runtime.streamers["text"][0].resident <= {0, 6}  # after the pass: the last group, 0 prefetched
    with pytest.raises(ValueError, match=r"streams whole passes; the slice slice\(None, 3, None\) takes part of it"):
        layers[:3]
    assert layers[:27] is layers and layers[:] is layers

    paths = resolve_paths(tmp_path)
    per_layer = text_layer_weights(paths, "flux2")
    assert len(per_layer) == 27 and len(set(per_layer)) == 1
    text = {"text": part_weights(paths)["text"]}  # the text part alone (the autoencoder is tiny-flux2's largest)
    f32 = torch.float32
    assert resident_bytes(text, plain.params, Residency(offload="model"), "cuda", f32, 0, per_layer) == 4 * text["text"]
    blocks = Residency(offload="blocks", block_group=4)  # 8 of the 27 layers on the device at most
    assert resident_bytes(text, plain.params, blocks, "cuda", f32, 0, per_layer) == 4 * (text["text"] - 19 * per_layer[0])
    # --weights fp8 holds the transformer's block weights at a byte each, never the text encoder's
    assert resident_bytes(text, plain.params, blocks, "cuda", f32, 10**9, per_layer) == 4 * (text["text"] - 19 * per_layer[0])


def test_resident_bytes_counts_fp8_on_the_transformer_only(tiny_checkpoint, resident):
    """The weights a run holds on its device, per mode: fp8 (one byte a weight) is the transformer's
    blocks' Linears only; the text encoders and the autoencoder stay in the run's dtype."""
    from fluxspace.resources import part_weights, text_layer_weights
    from fluxspace.runtime import resident_bytes

    paths, bf16 = resident.paths, torch.bfloat16
    counts, layers = part_weights(paths), text_layer_weights(paths, "flux1")
    n_fp8 = counts["flow"] // 2
    assert len(layers) == 2  # tiny's T5: two encoder blocks

    def estimate(residency, n=n_fp8):
        return resident_bytes(counts, resident.params, residency, "cuda", bf16, n, layers)

    two_byte = {part: 2 * n for part, n in counts.items()}
    assert estimate(Residency()) == sum(two_byte.values()) - n_fp8  # all resident, the fp8 share at a byte
    assert estimate(Residency(offload="model")) == max(two_byte["flow"] - n_fp8, two_byte["text"], two_byte["ae"])
    assert estimate(Residency(offload="model"), 0) == max(two_byte.values())
    assert estimate(Residency(offload="model", text_device="cpu")) == max(two_byte["flow"] - n_fp8, two_byte["ae"])
    # On the CPU nothing is offloaded: every part counts, in the run's dtype but the fp8 weights.
    assert resident_bytes(counts, resident.params, Residency(offload="model"), "cpu", bf16, n_fp8, layers) == (
        sum(two_byte.values()) - n_fp8
    )
    # Block streaming, one block a group: two blocks on the device (the largest counted: tiny's double
    # block), the rest of the transformer whole; fp8 weights pro rata of the blocks held.
    blocks = [*resident.flow.double_blocks, *resident.flow.single_blocks]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    assert len(sizes) == 3 and max(sizes) == sizes[0]
    held = counts["flow"] - sum(sizes) + 2 * sizes[0]
    streaming = Residency(offload="blocks", block_group=1)
    flow = {"flow": counts["flow"]}
    assert resident_bytes(flow, resident.params, streaming, "cuda", bf16, 0, layers) == 2 * held
    fp8_held = n_fp8 * 2 * sizes[0] // sum(sizes)
    assert resident_bytes(flow, resident.params, streaming, "cuda", bf16, n_fp8, layers) == 2 * held - fp8_held
