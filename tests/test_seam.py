"""The edit seam: edit=None is the plain model bit for bit, a recorder changes nothing and sees every block."""


import torch
from tiny import tiny_inputs as _tiny_inputs
from tiny import tiny_model as _tiny_model

from flux_core.recorder import Recorder


def tiny_inputs(model, B=2, h=3, w=4, T=5, seed=0):
    return _tiny_inputs(model, B=B, h=h, w=w, T=T, t=(0.9, 0.4), seed=seed)


def tiny_model(depth=2, single=3):
    return _tiny_model(depth, single)


def test_recorder_is_transparent_and_ordered():
    model = tiny_model()
    inp = tiny_inputs(model)
    with torch.inference_mode():
        plain = model(**inp)
        rec = Recorder(keep=("img_attn_out", "attn"), attention_maps=True)
        recorded = model(**inp, edit=rec)
        model(**inp, edit=rec)
    assert torch.equal(plain, recorded)
    assert [(e.kind, e.index, e.forward) for e in rec.entries] == [
        (kind, i, f) for f in (0, 1) for kind, n in (("double", 2), ("single", 3)) for i in range(n)
    ]
    first = rec.select(forward=0)
    assert first[0].tensors["img_attn_out"].shape == (2, 12, model.params.hidden_size)
    assert first[2].tensors["attn"].shape == (2, 17, model.params.hidden_size)
    maps = first[0].tensors["attention_map"]
    assert maps.shape == (2, 17, 17)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 17))


def test_recorder_block_filter_and_bad_field():
    model = tiny_model()
    rec = Recorder(keep=("q",), blocks=[("single", 1)])
    with torch.inference_mode():
        model(**tiny_inputs(model), edit=rec)
    assert [(e.kind, e.index) for e in rec.entries] == [("single", 1)]
    try:
        Recorder(keep=("nope",))
    except ValueError as e:
        assert "unknown recorder fields ['nope']" in str(e)
    else:
        raise AssertionError("no error for an unknown field")


class ZeroImageAttention:
    """An edit that drops the image attention update of double block 0: the output must change."""

    def vectors(self, model, vec, timesteps, y, guidance):
        from flux_core.seam import ModVectors

        return ModVectors(img=vec, txt=vec, out=vec)

    def double_block(self, site):
        img_out, txt_out = site.outputs()
        return (torch.zeros_like(img_out) if site.index == 0 else img_out), txt_out

    def single_block(self, site):
        return site.attention()


def test_an_edit_changes_what_it_returns():
    model = tiny_model()
    inp = tiny_inputs(model)
    with torch.inference_mode():
        plain = model(**inp)
        edited = model(**inp, edit=ZeroImageAttention())
    assert not torch.allclose(plain, edited)
