"""Runtime options on FLUX.2: the tools written for FLUX.1 (flux_core/offload.py, flux_core/runtime) rewrite
the FLUX.2 model from outside as they do FLUX.1's, LoRA (flux_core/lora) included.

- block streaming: bit for bit the resident model's outputs, plain and with a FluxSpace edit; at most two
  block groups resident while a block runs (read from inside, through the seam).
- fp8 (weight-only e4m3fn): every Linear of the blocks is stored in fp8 (the shared modulations, embedders
  and final layer are not: 5.0% of klein 4B's weights, 2.5% of dev's). Against float32 the tiny model's
  output moves by 4.7% (4.5% with a FluxSpace edit, no hard mask); bound 8%. At hidden 64 each output
  sums few rounded products; benchmarks/fp8.py measures FLUX.1 at full width (6.4% against bf16).
- regional compile: rtol = atol = 1e-5 against eager under inductor (float32, CPU); one graph per block
  class; a FluxSpace edit compiles on its first edited step and never again ("eager" backend, which
  runs dynamo's guards and recompiles without code generation; see tests/test_compile.py).
"""

import pytest
import torch
from compile_probe import CountingSchedule, graphs
from test_flux2_model import rel_err
from tiny import tiny_flux2, tiny_flux2_inputs

from flux_core.flux2.model import SIZES, Flux2
from flux_core.flux2.sampling import denoise, get_schedule, img_ids, txt_ids
from flux_core.lora import LoraScales, LowRank, attach, fuse, linear_shapes
from flux_core.offload import Mover, stream_blocks, unstream_blocks
from flux_core.runtime import Fp8Linear, compile_blocks, quantize_linears
from flux_core.runtime.fp8 import is_quantized_module
from fluxspace.spec import Concept, EditSpec, EncodedEdit
from fluxspace.step import FluxSpaceEdit, FluxSpaceSchedule

TOL = dict(rtol=1e-5, atol=1e-5)
SPEC = EditSpec(concepts=(Concept("a", 4.0, tau_m=0.5),))
h, w, T = 3, 4, 5


def encoded(model, seed=2) -> EncodedEdit:
    g = torch.Generator().manual_seed(seed)
    return EncodedEdit(torch.randn(2, T, model.params.context_in_dim, generator=g), None, [[1, 2]])


# ---------------------------------------------------------------------------------------------- offload


class Residents(FluxSpaceEdit):
    """The FluxSpace edit, noting at every block which block groups the streamer holds."""

    def __init__(self, streamer, *a):
        super().__init__(*a)
        self.streamer, self.seen = streamer, []

    def double_block(self, site):
        self.seen.append(("double", site.index, sorted(self.streamer.resident)))
        return super().double_block(site)

    def single_block(self, site):
        self.seen.append(("single", site.index, sorted(self.streamer.resident)))
        return super().single_block(site)


def test_block_streaming_gives_the_resident_outputs_bit_for_bit():
    model = tiny_flux2(depth=2, depth_single_blocks=3)
    inp, enc = tiny_flux2_inputs(model.params), encoded(model)
    keys = list(model.state_dict())
    with torch.inference_mode():
        plain, edited = model(**inp), model(**inp, edit=FluxSpaceEdit(SPEC, enc))
    mover = Mover("cpu")
    streamer = stream_blocks(model, 2, mover, "cpu")  # groups {d0, d1}, {s0, s1}, {s2}
    probe = Residents(streamer, SPEC, enc)
    with torch.inference_mode():
        assert torch.equal(model(**inp), plain)
        assert torch.equal(model(**inp, edit=probe), edited)
    assert list(model.state_dict()) == keys  # the same names: the streamed lists hold the same blocks
    assert [g for kind, i, g in probe.seen] == [[0, 1], [0, 1], [1, 2], [1, 2], [0, 2]]  # group g, then g + 1
    assert mover.moves[("blocks.0", "in")] == 3  # each forward brings group 0 in (the third one: prefetched)
    streamer.release()
    unstream_blocks(model)
    assert type(model.double_blocks) is torch.nn.ModuleList


# ---------------------------------------------------------------------------------------------- fp8


def test_fp8_stores_every_block_linear_and_moves_the_output_little():
    model = tiny_flux2()
    inp = tiny_flux2_inputs(model.params)
    spec = EditSpec(
        concepts=(Concept("a", 4.0, tau_m=0.0),)
    )  # no hard mask, whose threshold rounding can flip
    with torch.inference_mode():
        full, edited_full = model(**inp), model(**inp, edit=FluxSpaceEdit(spec, encoded(model)))
    quantize_linears(model)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert (
        len(fp8) == 8 * model.params.depth + 2 * model.params.depth_single_blocks
    )  # qkv, proj, mlp.0/.2 x 2; linear1/2
    assert all(n.startswith(("double_blocks.", "single_blocks.")) for n in fp8)
    with torch.inference_mode():
        err = rel_err(model(**inp), full)
        err_edit = rel_err(model(**inp, edit=FluxSpaceEdit(spec, encoded(model))), edited_full)
    print(f"fp8 against float32, tiny FLUX.2: plain {err:.4f}, FluxSpace edit {err_edit:.4f}")
    assert 0 < err < 0.08 and 0 < err_edit < 0.08, (err, err_edit)


@pytest.mark.parametrize("name, share", [("flux2-klein-4b", 0.0503), ("flux2-dev", 0.0253)])
def test_fp8_leaves_out_a_small_share_of_the_weights(name, share):
    with torch.device("meta"):
        model = Flux2(SIZES[name])
    total = sum(p.numel() for p in model.parameters())
    stored = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and is_quantized_module(n)
    )
    assert abs((1 - stored / total) - share) < 0.001, (
        f"{name}: {1 - stored / total:.4f} of the weights stay unquantized"
    )


# ---------------------------------------------------------------------------------------------- compile


def test_regional_compile_matches_eager_with_one_graph_per_block_class(fresh_dynamo):
    model = tiny_flux2(depth=2, depth_single_blocks=3)
    inp = tiny_flux2_inputs(model.params)
    with torch.inference_mode():
        plain = model(**inp)
    assert compile_blocks(model) is model
    with torch.inference_mode():
        torch.testing.assert_close(model(**inp), plain, **TOL)
        assert graphs() == 2  # one double-block graph, one single-block graph, for all five blocks
        model(**tiny_flux2_inputs(model.params, seed=7))
        assert graphs() == 2  # new inputs of the same shapes: no recompile


def sample(model, schedule, steps=4):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, h * w, model.params.in_channels, generator=g)
    txt = torch.randn(1, T, model.params.context_in_dim, generator=g)
    return denoise(model, x, img_ids(1, h, w), txt, txt_ids(1, T), get_schedule(steps, h * w), 4.0,
                   progress=False, edit=schedule)  # fmt: skip


def test_fluxspace_edit_on_flux2_compiles_on_its_first_step_only(fresh_dynamo):
    model, enc = tiny_flux2(), None
    enc = encoded(model)
    eager = sample(model, FluxSpaceSchedule(SPEC, enc))
    compile_blocks(model, backend="eager")
    schedule = CountingSchedule(FluxSpaceSchedule(SPEC, enc, keep_masks=True))
    out = sample(model, schedule)
    seen = [*schedule.seen, graphs()]
    assert seen[1] > seen[0] == 0
    assert seen[1:] == [seen[1]] * 4, f"recompiled after the first step: graphs before each step {seen}"
    torch.testing.assert_close(out, eager, **TOL)


# ---------------------------------------------------------------------------------------------- LoRA


def test_lora_on_flux2_streams_with_its_blocks():
    """LoRA files on FLUX.2 are read and checked in tests/test_flux2_lora.py; here an unfused LoRA (buffers on
    the swapped-in LoraLinear) moves with its block group: streaming gives the resident output bit for bit,
    and a fused one is undone bit for bit."""
    model = tiny_flux2(depth=2, depth_single_blocks=3)
    inp = tiny_flux2_inputs(model.params)
    g = torch.Generator().manual_seed(5)
    updates = {n: LowRank(torch.randn(2, i, generator=g) * 0.05, torch.randn(o, 2, generator=g) * 0.05)
               for n, (o, i) in linear_shapes(model).items() if n.startswith(("double_blocks.", "single_blocks."))}  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        plain = model(**inp)
        fused = fuse(model, updates, 0.7)
        with_lora = model(**inp)
        fused.undo()
    # the weights, not the outputs: a restored weight is a new allocation, and 2-thread GEMMs may round apart
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    attach(model, "style", updates, LoraScales(style=0.7))
    with torch.inference_mode():
        unfused = model(**inp)
    assert rel_err(unfused, with_lora) < 1e-5 and rel_err(unfused, plain) > 1e-3
    streamer = stream_blocks(model, 2, Mover("cpu"), "cpu")
    with torch.inference_mode():
        assert torch.equal(model(**inp), unfused)
    streamer.release()
    unstream_blocks(model)
