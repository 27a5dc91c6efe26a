"""edit_image end to end on a random tiny checkpoint set: outputs, masks, recorder, keyword tokens."""

import numpy as np
import pytest
import torch

import fluxspace.run
from fluxspace import Concept, EditSpec, SampleSettings, edit_image, generate
from fluxspace.projection import keyword_attention
from fluxspace.spec import encode_edit

SETTINGS = SampleSettings(width=64, height=48, steps=4)


def test_edit_image_returns_images_masks_and_recorder(models):
    spec = EditSpec(concepts=(Concept("glasses", 4.0, 0.5), Concept("red hat", 2.0, 0.0)), start=1)
    result = edit_image(models, "a smiling woman", spec, seed=5, settings=SETTINGS, record=True, progress=False)
    assert result.original.size == result.edited.size == (64, 48)
    assert len(result.masks) == 2 and result.masks[0].shape == (3, 4)
    assert torch.equal(result.masks[1], torch.ones(3, 4))  # tau 0: every token, every time
    assert 0 < result.masks[0].mean() < 1
    # Steps 1..3 edited, each recording every double and single block.
    p = models.flow.params
    assert len(result.recorder.entries) == 3 * (p.depth + p.depth_single_blocks)
    assert [e.kind for e in result.recorder.select(forward=0)] == ["double"] * p.depth + ["single"] * p.depth_single_blocks
    # Every edited double block's masks, per step, in order.
    assert [(st, b) for st, b, _ in result.block_masks] == [(st, b) for st in (1, 2, 3) for b in range(p.depth)]
    assert result.block_masks[0][2][1].shape == (1, 12)
    plain = generate(models, ["a smiling woman"], [5], SETTINGS, progress=False)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(result.original))
    assert not np.array_equal(np.asarray(result.original), np.asarray(result.edited))


def test_edit_that_never_switches_on_returns_the_plain_image(models):
    spec = EditSpec(concepts=(Concept("glasses", 4.0),), start=0.0)  # t <= 0 is never reached by a step
    result = edit_image(models, "a man", spec, seed=1, settings=SETTINGS, progress=False)
    assert np.array_equal(np.asarray(result.original), np.asarray(result.edited))


def test_mask_uses_every_sub_token_of_a_multi_token_keyword(models):
    spec = EditSpec(concepts=(Concept("portrait"),))
    enc = encode_edit(spec, models.text)
    pieces = models.text.word_token_positions("portrait", "portrait")
    assert len(pieces) >= 2 and enc.positions[0] == pieces
    # keyword_attention averages exactly those columns of the softmax over the text keys.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    probs = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1).mean(1)  # (1, 5, 9)
    torch.testing.assert_close(keyword_attention(q, k, pieces), probs[..., pieces].mean(-1))


def test_mask_words_must_be_in_the_edit_prompt(models):
    spec = EditSpec(concepts=(Concept("red hat", mask_words=("hat",)),))
    assert encode_edit(spec, models.text).positions[0] == models.text.word_token_positions("red hat", "hat")


def test_bad_edit_is_refused_before_sampling(models, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(fluxspace.run, "euler", fail)
    with pytest.raises(ValueError, match=r"start step 4 is past the last step: 4 steps run as steps 0..3"):
        edit_image(models, "a man", EditSpec(concepts=(Concept("hat"),), start=4), settings=SETTINGS)
    with pytest.raises(ValueError, match=r"double block indices \[5\] out of range"):
        edit_image(models, "a man", EditSpec(concepts=(Concept("hat"),), blocks=(5,)), settings=SETTINGS)


def test_plain_runs_reuse_the_plain_run_and_change_nothing(models):
    from fluxspace.editing import PlainRuns

    runs = PlainRuns(size=2)
    for start in (0, 2):
        for lam in (4.0, -2.0):
            spec = EditSpec(concepts=(Concept("glasses", lam),), start=start)
            fresh = edit_image(models, "a smiling woman", spec, seed=5, settings=SETTINGS, progress=False)
            reused = edit_image(models, "a smiling woman", spec, seed=5, settings=SETTINGS, progress=False, plain_runs=runs)
            assert np.array_equal(np.asarray(fresh.original), np.asarray(reused.original))
            assert np.array_equal(np.asarray(fresh.edited), np.asarray(reused.edited))
    assert runs.hits == 2  # the second strength at each start sampled only the edited branch
    edit_image(models, "a man", spec, seed=5, settings=SETTINGS, progress=False, plain_runs=runs)
    assert len(runs.runs) == 2 and ("a man", 5) == next(reversed(runs.runs))[:2]  # at most `size`, latest kept
