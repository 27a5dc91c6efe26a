"""Regional compile (flux_core/runtime/compile.py): same outputs as eager, one graph per block class,
and a FluxSpace edit that compiles on its first step and never again.

Tolerance: float32 on the CPU, rtol = atol = 1e-5 (inductor reorders and fuses float sums; the tiny
model's outputs are O(1)). Compile time on 2 CPU cores: inductor only for the plain forward; the edit
tests use the "eager" backend, which runs dynamo (its guards, graph breaks and recompiles, all that
decides whether a step recompiles) and skips code generation. The edited forward under inductor is
checked by `benchmarks/edit_cost.py --compile` (rel err column) rather than here: lowering the edit's
graphs costs a minute on a cold 2-core CI machine.
"""

import numpy as np
import pytest
import torch
from compile_probe import CountingSchedule, graphs
from tiny import tiny_inputs, tiny_model

import flux_core.runtime.compile as runtime_compile
from flux_core.runtime import CompileUnsupported, check_compile_support, compile_blocks
from flux_core.sampling import denoise, get_schedule, img_ids, txt_ids
from fluxspace import Concept, EditSpec, SampleSettings, edit_image, load_models
from fluxspace.spec import EncodedEdit
from fluxspace.step import FluxSpaceSchedule

TOL = dict(rtol=1e-5, atol=1e-5)
h, w, T = 3, 4, 6


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py: a clean dynamo for each test


def encoded(model, n_concepts=1, seed=2):
    p = model.params
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(1 + n_concepts, T, p.context_in_dim, generator=g)
    return EncodedEdit(txt, torch.randn(1, p.vec_in_dim, generator=g), [[1, 2]] * n_concepts)


SPEC = EditSpec(concepts=(Concept("a", 4.0, 0.5),), lambda_coarse=0.5)


def test_compiled_blocks_match_eager_with_one_graph_per_block_class():
    model = tiny_model(depth=3, single=3)
    inp = tiny_inputs(model, h=h, w=w, T=T)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        plain = model(**inp)

    assert compile_blocks(model) is model
    assert model.state_dict().keys() == keys.keys()  # names and checkpoint keys unchanged
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    with torch.inference_mode():
        torch.testing.assert_close(model(**inp), plain, **TOL)
        assert graphs() == 2  # one double-block graph and one single-block graph serve all six blocks
        torch.testing.assert_close(model(**tiny_inputs(model, h=h, w=w, T=T, seed=7)), model.forward(**tiny_inputs(
            model, h=h, w=w, T=T, seed=7)), **TOL)  # fmt: skip
        assert graphs() == 2  # new inputs of the same shapes: no recompile


def sample(model, schedule, steps=4):
    g = torch.Generator().manual_seed(3)
    p = model.params
    x = torch.randn(1, h * w, p.in_channels, generator=g)
    txt = torch.randn(1, T, p.context_in_dim, generator=g)
    y = torch.randn(1, p.vec_in_dim, generator=g)
    ts = get_schedule(steps, h * w)
    with torch.inference_mode():
        return denoise(model, x, img_ids(1, 16 * h, 16 * w), txt, txt_ids(1, T), y, ts, guidance=3.5,
                       progress=False, edit=schedule)  # fmt: skip


def test_fluxspace_edit_compiles_on_its_first_step_only():
    model = tiny_model()
    enc = encoded(model)
    eager = sample(model, FluxSpaceSchedule(SPEC, enc, keep_masks=True))

    compile_blocks(model, backend="eager")
    schedule = CountingSchedule(FluxSpaceSchedule(SPEC, enc, keep_masks=True))  # a new edit every step
    out = sample(model, schedule)
    seen = [*schedule.seen, graphs()]  # before steps 0..3, and after the run
    assert seen[1] > seen[0] == 0  # step 0 compiled the blocks with the edit
    assert seen[1:] == [seen[1]] * 4, f"recompiled after the first step: graphs before each step {seen}"
    torch.testing.assert_close(out, eager, **TOL)
    assert len(schedule.inner.masks.entries) == 4 * len(model.double_blocks)  # the eager MaskLog still ran


def test_edit_image_with_recorder_under_compile_recompiles_nothing_on_a_second_run(tiny_checkpoint):
    models = load_models(tiny_checkpoint.transformer)
    settings = SampleSettings(width=64, height=48, steps=4)
    spec = EditSpec(concepts=(Concept("glasses", 4.0, 0.5),), lambda_coarse=0.5)
    eager = edit_image(models, "a man", spec, seed=1, settings=settings, record=True, progress=False)

    compile_blocks(models.flow, backend="eager")
    first = edit_image(models, "a man", spec, seed=1, settings=settings, record=True, progress=False)
    compiled = graphs()
    second = edit_image(models, "a man", spec, seed=2, settings=settings, record=True, progress=False)
    assert graphs() == compiled > 0
    assert np.array_equal(np.asarray(first.edited), np.asarray(eager.edited))
    assert len(first.recorder.entries) == len(eager.recorder.entries) > 0
    assert second.edited.size == first.edited.size


def test_compile_is_refused_with_one_line_where_it_cannot_work(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.3.1+cpu")
    with pytest.raises(CompileUnsupported, match=r"--compile needs torch >= 2.5 .* this is torch 2.3.1\+cpu"):
        check_compile_support("cpu")
    monkeypatch.undo()
    monkeypatch.setattr(runtime_compile.shutil, "which", lambda name: None)
    with pytest.raises(CompileUnsupported, match="--compile on the CPU needs a C\\+\\+ compiler") as e:
        compile_blocks(tiny_model())
    assert "\n" not in str(e.value)
    check_compile_support("cpu", backend="aot_eager")  # no code generation, no compiler needed
    with pytest.raises(CompileUnsupported, match="--compile supports cpu and cuda; got device mps"):
        check_compile_support("mps")
    with pytest.raises(TypeError, match="compile_blocks expects a flux_core.Flux"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_cli_refuses_compile_before_loading_anything(monkeypatch, tmp_path, capsys):
    from fluxspace.cli import main

    monkeypatch.setattr(runtime_compile.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--compile", "--quiet", "--out", str(tmp_path / "cat.png")])
    assert e.value.code == 2
    assert "fluxspace: error: --compile on the CPU needs a C++ compiler" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unfused_lora_under_compile_recompiles_only_for_a_new_strength():
    """LoraLinear modules inside the blocks compile with them: no recompile step after step; a new
    strength is a new constant in the graph (one recompile), and the output follows it."""
    from flux_core.lora import LoraScales, LowRank, attach, linear_shapes

    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    updates = {n: LowRank(torch.randn(2, i, generator=g) * 0.2, torch.randn(o, 2, generator=g) * 0.2)
               for n, (o, i) in linear_shapes(model).items() if n.startswith(("double_blocks.", "single_blocks."))}  # fmt: skip
    scales = LoraScales(a=0.5)
    attach(model, "a", updates, scales)
    enc = encoded(model)
    eager = sample(model, FluxSpaceSchedule(SPEC, enc))
    compile_blocks(model, backend="eager")
    schedule = CountingSchedule(FluxSpaceSchedule(SPEC, enc))
    out = sample(model, schedule)
    seen = [*schedule.seen, graphs()]
    assert seen[1] > 0 and seen[1:] == [seen[1]] * 4, f"recompiled after the first step: {seen}"
    torch.testing.assert_close(out, eager, **TOL)
    scales["a"] = 1.0
    again = sample(model, CountingSchedule(FluxSpaceSchedule(SPEC, enc)))
    assert not torch.allclose(again, out, **TOL), "the new strength reaches the compiled blocks"
    settled = graphs()
    sample(model, CountingSchedule(FluxSpaceSchedule(SPEC, enc)))
    assert graphs() == settled, "the same strength again compiles nothing"
