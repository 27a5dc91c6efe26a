"""The baselines of the edit-quality benchmark: output-level direction and prompt change, on a tiny checkpoint."""

import numpy as np
import pytest
import torch
from tiny import tiny_inputs, tiny_model

from fluxspace import Concept, EditSpec, SampleSettings, SamplingRun, generate
from fluxspace.baselines import DirectionVelocity, WithDirection, direction_edit, prompt_edit

SETTINGS = SampleSettings(width=64, height=48, steps=4, cfg_scale=2.0)


def spec(lam, **kw):
    return EditSpec(concepts=(Concept("glasses", lam, tau_m=0.0),), **kw)


@pytest.mark.parametrize("cfg_rows", [1, 2])
def test_output_direction_adds_lambda_times_edit_minus_prior(cfg_rows):
    model = tiny_model()
    inp = tiny_inputs(model, B=1, h=2, w=3, T=5, seed=3)
    g = torch.Generator().manual_seed(4)
    p = model.params
    e_txt, p_txt = (torch.randn(1, 5, p.context_in_dim, generator=g) for _ in range(2))
    e_vec, p_vec = (torch.randn(1, p.vec_in_dim, generator=g) for _ in range(2))
    wrapped = WithDirection(model, 3.0, e_txt, e_vec, p_txt, p_vec, batch=1)
    # With true CFG denoise stacks [positive; negative] rows of the same image.
    rows = {k: torch.cat([v] * cfg_rows) for k, v in inp.items()}
    with torch.inference_mode():
        got = wrapped(**rows)
        base = model(**rows)
        v_edit = model(**{**inp, "txt": e_txt, "y": e_vec})
        v_prior = model(**{**inp, "txt": p_txt, "y": p_vec})
    torch.testing.assert_close(got, base + 3.0 * (v_edit - v_prior).repeat(cfg_rows, 1, 1), rtol=1e-5, atol=1e-5)


def test_direction_velocity_is_the_plain_velocity_where_the_edit_is_off(models):
    run = SamplingRun.prepare(models, ["a smiling woman"], [5], SETTINGS, progress=False)
    v = DirectionVelocity(run, spec(3.0, start=2))
    x, t = run.inp.img.float(), run.timesteps[1]
    plain = run.velocity()(x, t, 1)
    assert torch.equal(v(x, t, 1), plain)  # off: the plain model
    assert not torch.equal(v(x, run.timesteps[2], 2), run.velocity()(x, run.timesteps[2], 2))  # on from step 2


def test_direction_edit_branches_from_the_plain_run(models):
    prompt = "a smiling woman"
    original, edited = direction_edit(models, prompt, spec(4.0, start=2), seed=5, settings=SETTINGS)
    plain = generate(models, [prompt], [5], SETTINGS, progress=False)[0]
    assert np.array_equal(np.asarray(original), np.asarray(plain))
    assert not np.array_equal(np.asarray(original), np.asarray(edited))
    # lambda 0 never switches on: the same image.
    a, b = direction_edit(models, prompt, spec(0.0), seed=5, settings=SETTINGS)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_direction_edit_refuses_what_the_output_level_has_not(models):
    with pytest.raises(ValueError, match="direction_edit takes one concept with tau_m=0"):
        direction_edit(models, "x", EditSpec(concepts=(Concept("glasses", 2.0, tau_m=0.5),)), settings=SETTINGS)
    with pytest.raises(ValueError, match="direction_edit takes one concept"):
        direction_edit(models, "x", spec(2.0, lambda_coarse=0.5), settings=SETTINGS)


def test_prompt_edit_same_prompt_same_image_other_prompt_other_image(models):
    a, b = prompt_edit(models, "a man", "a man", seed=2, settings=SETTINGS)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    c, d = prompt_edit(models, "a man", "a man, glasses", seed=2, settings=SETTINGS)
    assert np.array_equal(np.asarray(a), np.asarray(c)) and not np.array_equal(np.asarray(c), np.asarray(d))
    e, f = prompt_edit(models, "a man", "a man", seed=2, settings=SETTINGS, negative_prompt="glasses")
    assert not np.array_equal(np.asarray(e), np.asarray(f))
    with pytest.raises(ValueError, match="a negative prompt needs true CFG"):
        prompt_edit(models, "a man", "a man", settings=SampleSettings(width=64, height=48, steps=2, cfg_scale=1.0),
                    negative_prompt="glasses")  # fmt: skip
