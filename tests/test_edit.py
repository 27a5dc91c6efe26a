"""FluxSpace: the math, the shared-q/k/v execution, timing, and bad input."""

import math

import edit_probe
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_inputs, tiny_model

from flux_core.sampling import denoise, get_schedule, img_ids, txt_ids
from fluxspace.projection import coarse_pooled, concept_mask, edit_direction, orthogonal_component
from fluxspace.spec import Concept, EditSpec, EncodedEdit, validate
from fluxspace.step import FluxSpaceEdit, FluxSpaceSchedule

B, h, w, T = 2, 3, 4, 6  # 12 image tokens, 6 text tokens


def inputs(model, seed=1):
    return tiny_inputs(model, B=B, h=h, w=w, T=T, seed=seed)


def encoded(model, n_concepts=1, seed=2, prior=None):
    """Random branch text embeddings (prior + concepts) and a pooled coarse vector."""
    p = model.params
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(1 + n_concepts, T, p.context_in_dim, generator=g)
    if prior is not None:
        txt[0] = prior
    return EncodedEdit(txt, torch.randn(1, p.vec_in_dim, generator=g), [[1, 2]] * n_concepts)


def run_step(model, spec, enc, inp=None, spy_out=None):
    return edit_probe.run_step(model, spec, enc, inp or inputs(model), spy_out)


# ---------------------------------------------------------------------------------------------- pure math


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), c=st.integers(2, 64), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-2, 1.0, 30.0]))
def test_delta_is_orthogonal_to_the_prior(n, c, seed, scale):
    g = torch.Generator().manual_seed(seed)
    a_e, a_p = torch.randn(2, n, c, generator=g) * scale, torch.randn(2, n, c, generator=g) * scale
    delta = orthogonal_component(a_e, a_p)
    cos = torch.nn.functional.cosine_similarity(delta, a_p, dim=-1)
    assert delta.dtype == torch.float32
    assert cos.abs().max().item() <= 1e-5


def test_edit_direction_variants():
    a_e, a_phi = torch.randn(2, 5, 8), torch.randn(2, 1, 5, 8)[:, 0]
    assert torch.equal(edit_direction(a_e, a_phi), orthogonal_component(a_e, a_phi))
    assert torch.equal(edit_direction(a_e, a_phi, "difference"), a_e - a_phi)
    assert torch.equal(edit_direction(a_e, a_phi, "none"), a_e)


def test_delta_of_the_prior_itself_is_exactly_zero():
    a = torch.randn(3, 5, 16)
    assert torch.equal(orthogonal_component(a, a.clone()), torch.zeros_like(a))


def test_mask_thresholds():
    attn = torch.rand(2, 20)
    assert torch.equal(concept_mask(attn, 0.0), torch.ones(2, 20))
    sig5 = 1 / (1 + math.exp(-5))
    assert torch.equal(concept_mask(attn, sig5 + 1e-4), torch.zeros(2, 20))
    m = concept_mask(attn, 0.5)  # tokens above the midpoint of the min-max range
    lo, hi = attn.amin(-1, keepdim=True), attn.amax(-1, keepdim=True)
    assert torch.equal(m.bool(), (attn - lo) / (hi - lo) >= 0.5)


def test_full_coarse_is_orthogonal_to_the_base_pooled_vector():
    c, ce = torch.randn(3, 32), torch.randn(3, 32)
    c_hat = coarse_pooled(c, ce, 1.0)
    cos = torch.nn.functional.cosine_similarity(c_hat, c, dim=-1)
    assert cos.abs().max().item() <= 1e-5
    torch.testing.assert_close(coarse_pooled(c, ce, 0.0), c)


# ---------------------------------------------------------------------------------------------- inside the model


def test_edited_attention_is_linear_in_lambda():
    model, enc = tiny_model(), None
    enc = encoded(model)
    outs = {}
    for lam in (1.0, 2.5, -3.0):
        spec = EditSpec(concepts=(Concept("x", lambda_fine=lam, tau_m=0.3),))
        outs[lam] = run_step(model, spec, enc)[1][0]  # block 0 (a_hat, a_base)
    d1 = outs[1.0][0] - outs[1.0][1]
    for lam in (2.5, -3.0):
        torch.testing.assert_close(outs[lam][0] - outs[lam][1], lam * d1, rtol=1e-5, atol=1e-5)
    assert d1.abs().max() > 1e-3  # the edit does something


def naive_branch_attention(model, inp, branch_txt, img_in):
    """edit_probe.naive_branch_attention on FLUX.1: its double blocks take (img, txt, vec, pe)."""
    with torch.inference_mode():
        vec = model.conditioning(inp["timesteps"], inp["y"], inp["guidance"])
        pe = model.pe_embedder(torch.cat((inp["txt_ids"], inp["img_ids"]), dim=1))
    return edit_probe.naive_branch_attention(model, inp, branch_txt, img_in, vec, (vec, pe))


def test_shared_qkv_branches_equal_naive_separate_computation():
    model = tiny_model(depth=3)
    inp = inputs(model)
    enc = encoded(model, n_concepts=2)
    spec = EditSpec(concepts=(Concept("a", 2.0, tau_m=0.0), Concept("b", -1.5, tau_m=0.0)))
    spies = []
    _, got = run_step(model, spec, enc, inp, spies)
    img_in = spies[0].img_in  # the (edited) image stream entering each double block
    a_prior = naive_branch_attention(model, inp, enc.branch_txt[:1], img_in)
    a_1 = naive_branch_attention(model, inp, enc.branch_txt[1:2], img_in)
    a_2 = naive_branch_attention(model, inp, enc.branch_txt[2:3], img_in)
    for i in range(3):
        a_hat, a_base = got[i]
        expected = (
            a_base
            + 2.0 * orthogonal_component(a_1[i], a_prior[i])
            - 1.5 * orthogonal_component(a_2[i], a_prior[i])
        )
        err = ((a_hat - expected).norm() / expected.norm()).item()
        assert err <= 1e-5, f"block {i}: relative error {err:.2e}"


def test_several_concepts_in_one_pass_equal_one_by_one():
    # One double block, so every run sees the same image stream; the deltas must simply add up.
    model = tiny_model(depth=1)
    inp = inputs(model)
    enc2 = encoded(model, n_concepts=2)
    c1, c2 = Concept("a", 3.0, tau_m=0.4), Concept("b", 2.0, tau_m=0.6)
    both = run_step(model, EditSpec(concepts=(c1, c2)), enc2, inp)[1]
    one = run_step(model, EditSpec(concepts=(c1,)), EncodedEdit(enc2.branch_txt[:2], None, enc2.positions[:1]), inp)[1]
    two = run_step(
        model, EditSpec(concepts=(c2,)), EncodedEdit(enc2.branch_txt[::2].clone(), None, enc2.positions[1:]), inp
    )[1]
    for i in both:
        base = both[i][1]
        torch.testing.assert_close(both[i][0] - base, (one[i][0] - base) + (two[i][0] - base), rtol=1e-5, atol=1e-5)


def sample(model, editor=None, steps=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    p = model.params
    x = torch.randn(1, h * w, p.in_channels, generator=g)
    txt = torch.randn(1, T, p.context_in_dim, generator=g)
    y = torch.randn(1, p.vec_in_dim, generator=g)
    ts = get_schedule(steps, h * w)
    return denoise(model, x, img_ids(1, 16 * h, 16 * w), txt, txt_ids(1, T), y, ts, guidance=3.5, progress=False, edit=editor)


@pytest.mark.parametrize(
    "spec",
    [
        EditSpec(concepts=(Concept("x", lambda_fine=0.0),), lambda_coarse=0.0),
        EditSpec(concepts=(Concept("x", lambda_fine=5.0),), lambda_coarse=0.7, start=0.0),  # t <= 0: never on
    ],
    ids=["zero-scales", "start-after-last-step"],
)
def test_inactive_edits_are_bit_identical_to_plain_sampling(spec):
    model = tiny_model()
    plain = sample(model)
    edited = sample(model, FluxSpaceSchedule(spec, encoded(model)))
    assert torch.equal(plain, edited)


def test_edit_prompt_equal_to_non_empty_prior_changes_nothing():
    model = tiny_model()
    prior = torch.randn(T, model.params.context_in_dim)
    enc = encoded(model, prior=prior)
    enc.branch_txt[1] = prior  # the concept's prompt embeds exactly like the prior
    spec = EditSpec(concepts=(Concept("same", lambda_fine=7.0, tau_m=0.0),), prior_prompt="a face")
    # Delta is exactly zero; the base attention of an edited step is computed by the shared-key
    # merge (attention.py), equal to the plain kernel up to float32 rounding.
    torch.testing.assert_close(sample(model), sample(model, FluxSpaceSchedule(spec, enc)), rtol=1e-5, atol=1e-5)


def test_active_edit_changes_the_image_and_logs_masks():
    model = tiny_model()
    editor = FluxSpaceSchedule(EditSpec(concepts=(Concept("x", 4.0, tau_m=0.5),), lambda_coarse=0.5, start=1), encoded(model))
    assert not torch.allclose(sample(model), sample(model, editor))
    (mask,) = editor.masks.mean()
    assert editor.masks.count == 3 * model.params.depth  # steps 1..3, every double block
    assert mask.shape == (1, h * w) and 0 < mask.mean() < 1


def test_coarse_only_runs_no_branch_streams():
    model = tiny_model()
    spec = EditSpec(concepts=(Concept("x", lambda_fine=0.0),), lambda_coarse=0.8)
    step = FluxSpaceEdit(spec, encoded(model))
    with torch.inference_mode():
        out = model(**inputs(model), edit=step)
        plain = model(**inputs(model))
    assert step.streams is None
    assert not torch.allclose(out, plain)


def test_coarse_targets_differ():
    model = tiny_model()
    outs = []
    for target in ("txt", "both", "global"):
        spec = EditSpec(concepts=(Concept("x", lambda_fine=0.0),), lambda_coarse=0.8, coarse_target=target)
        with torch.inference_mode():
            outs.append(model(**inputs(model), edit=FluxSpaceEdit(spec, encoded(model))))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_projection_before_output_projection_differs_but_is_linear():
    model = tiny_model()
    enc = encoded(model)
    a = run_step(model, EditSpec(concepts=(Concept("x", 1.0, 0.0),), projection="before_proj"), enc)[1][0]
    b = run_step(model, EditSpec(concepts=(Concept("x", 2.0, 0.0),), projection="before_proj"), enc)[1][0]
    c = run_step(model, EditSpec(concepts=(Concept("x", 1.0, 0.0),)), enc)[1][0]
    torch.testing.assert_close(b[0] - b[1], 2 * (a[0] - a[1]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a[0], c[0])


@pytest.mark.parametrize("removal", ["difference", "none"])
def test_prior_removal_ablations_add_their_direction(removal):
    # A_hat - A_b = lambda * (A_e - A_phi) or lambda * A_e, read back through the branches' plain outputs.
    model = tiny_model()
    enc = encoded(model)
    spec = EditSpec(concepts=(Concept("x", 3.0, 0.0),), prior_removal=removal)
    spies = []
    run_step(model, spec, enc, spy_out=spies)
    orth = run_step(model, EditSpec(concepts=(Concept("x", 3.0, 0.0),)), enc)[1][0]
    edited, base = spies[0].outputs[0]
    delta = (edited - base) / 3.0  # (B, N, C)
    assert not torch.allclose(delta, (orth[0] - orth[1]) / 3.0, atol=1e-4)
    # Difference: zero when the concept embeds like the prior, as the orthogonal component is.
    if removal == "difference":
        same = encoded(model)
        same.branch_txt[1] = same.branch_txt[0]
        e, b = run_step(model, spec, same)[1][0]
        torch.testing.assert_close(e, b, rtol=1e-5, atol=1e-5)
    else:  # none: linear in lambda and not zero for an edit prompt equal to the prior
        twice = run_step(model, EditSpec(concepts=(Concept("x", 6.0, 0.0),), prior_removal="none"), enc)[1][0]
        torch.testing.assert_close(twice[0] - twice[1], 2 * (edited - base), rtol=1e-4, atol=1e-5)


def test_edit_blocks_subset_only_touches_those_blocks():
    model = tiny_model(depth=3)
    got = run_step(model, EditSpec(concepts=(Concept("x", 3.0, 0.0),), blocks=(1,)), encoded(model))[1]
    # Block 0 still carries the branch streams (merged attention: equal to plain up to rounding);
    # block 2 is past the last edited block and runs the plain path.
    torch.testing.assert_close(got[0][0], got[0][1], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2][0], got[2][1])
    assert (got[1][0] - got[1][1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "spec, message",
    [
        (EditSpec(concepts=(Concept("  "),)), "concept 0: the edit prompt is empty"),
        (EditSpec(concepts=(Concept("hat", mask_words=("glasses",)),)), "mask word 'glasses' does not occur in its edit prompt 'hat'"),
        (EditSpec(concepts=(Concept("hat", lambda_fine=float("nan")),)), "lambda_fine must be a finite number; got nan"),
        (EditSpec(concepts=(Concept("hat"),), lambda_coarse=float("inf")), "lambda_coarse must be a finite number; got inf"),
        (EditSpec(concepts=(Concept("hat", tau_m=1.5),)), r"tau_m must be in \[0, 1\]; got 1.5"),
        (EditSpec(concepts=(Concept("hat", tau_m=-0.1),)), r"tau_m must be in \[0, 1\]; got -0.1"),
        (EditSpec(concepts=(Concept("hat"),), start=3, end=2), r"start \(3\) is not before end \(2\)"),
        (EditSpec(concepts=(Concept("hat"),), start=0.2, end=0.6), r"start \(0.2\) is not before end \(0.6\)"),
        (EditSpec(concepts=(Concept("hat"),), start=10), r"start step 10 is past the last step: 10 steps run as steps 0..9"),
        (EditSpec(concepts=(Concept("hat"),), start=1.5), r"start given as a time must be in \[0, 1\]; got 1.5"),
        (EditSpec(concepts=(Concept("hat"),), blocks=(0, 19)), r"double block indices \[19\] out of range; this model has double blocks 0..18"),
        (EditSpec(concepts=(Concept("hat"),), projection="inside"), "unknown projection 'inside'; valid: after_proj, before_proj"),
        (EditSpec(concepts=(Concept("hat"),), coarse_target="vec"), "unknown coarse_target 'vec'; valid: txt, both, global"),
        (EditSpec(concepts=(Concept("hat"),), prior_removal="project"), "unknown prior_removal 'project'; valid: orthogonal, difference, none"),
        (EditSpec(concepts=(Concept("hat"),), prior_removal="none", reference=True), "reference mode reproduces the unofficial code, which removes the prior orthogonally"),
        (EditSpec(), "an edit needs at least one concept"),
    ],
)
def test_bad_edits_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        validate(spec, num_steps=10, num_double_blocks=19)


# ---------------------------------------------------------------------------------------------- reference mode


def test_reference_mode_matches_ours_where_they_agree():
    # Float32, no mask, one concept: the unofficial arithmetic (full attention per branch, eps added)
    # and ours (shared image attention, floor) compute the same edit.
    model = tiny_model()
    enc = encoded(model)
    ours = run_step(model, EditSpec(concepts=(Concept("x", 3.0, 0.0),), lambda_coarse=0.4), enc)[0]
    ref = run_step(model, EditSpec(concepts=(Concept("x", 3.0, 0.0),), lambda_coarse=0.4, reference=True), enc)[0]
    torch.testing.assert_close(ref, ours, rtol=1e-4, atol=1e-5)


def test_reference_mode_skips_negative_lambda():
    model = tiny_model(depth=1)
    out = run_step(model, EditSpec(concepts=(Concept("x", -3.0, 0.0),), reference=True), encoded(model))[1]
    torch.testing.assert_close(out[0][0], out[0][1], rtol=1e-5, atol=1e-6)


def test_reference_mode_takes_one_concept():
    spec = EditSpec(concepts=(Concept("a"), Concept("b")), reference=True)
    with pytest.raises(ValueError, match="reference mode reproduces the unofficial code, which takes exactly one concept; got 2"):
        validate(spec, num_steps=10, num_double_blocks=19)
