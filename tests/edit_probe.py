"""What the edit tests share: a Spy that keeps what an edit returned at every double block, one
model forward with a FluxSpace edit, and the branch attention the slow way. Model-agnostic: the same probe reads FLUX.1 (tests/test_edit.py)
and FLUX.2 (tests/test_flux2_fluxspace.py), since both hand the edit the same sites (flux_core/seam.py)."""

import torch

from flux_core.recorder import Recorder
from fluxspace.step import FluxSpaceEdit


class Spy:
    """Wraps an edit and keeps, block by block, what its double_block returned beside the plain outputs.

    outputs[i] = (edited img_attn_out, plain img_attn_out) (B, N, C); txt_outputs[i] the same for the
    text stream (B, T, C); img_in[i] the image stream that entered block i.
    """

    def __init__(self, inner):
        self.inner, self.outputs, self.txt_outputs, self.img_in = inner, {}, {}, {}

    def vectors(self, *a):
        return self.inner.vectors(*a)

    def double_block(self, site):
        out = self.inner.double_block(site)
        plain_img, plain_txt = site.outputs()
        self.outputs[site.index] = (out[0].clone(), plain_img.clone())
        self.txt_outputs[site.index] = (out[1].clone(), plain_txt.clone())
        self.img_in[site.index] = site.img.clone()
        return out

    def single_block(self, site):
        return self.inner.single_block(site)


def run_step(model, spec, enc, inp: dict, spy_out: list | None = None, n_generated: int | None = None):
    """One forward of `model` on `inp` with FluxSpaceEdit(spec, enc): (output, Spy.outputs).

    spy_out: a list the Spy is appended to, for its other records."""
    spy = Spy(FluxSpaceEdit(spec, enc, n_generated=n_generated))
    with torch.inference_mode():
        out = model(**inp, edit=spy)
    if spy_out is not None:
        spy_out.append(spy)
    return out, spy.outputs


def naive_branch_attention(model, inp: dict, branch_txt, img_in, vec, block_args) -> list[torch.Tensor]:
    """A(x, c) of every double block, the slow way: the branch's own text stream carried through each
    block by the block's own forward, against the image stream that entered the block (img_in[i], as
    Spy.img_in keeps it).

    vec: the model's conditioning vector (handed to the Recorder); block_args: what a double block takes
    after (img, txt), which differs by family: (vec, pe) on FLUX.1, (pe, mods) on FLUX.2.
    """
    B = inp["img"].shape[0]
    with torch.inference_mode():
        s = model.txt_in(branch_txt.expand(B, -1, -1))
        out = []
        for i, block in enumerate(model.double_blocks):
            rec = Recorder(keep=("img_attn_out",))
            rec.vectors(model, vec, None, None, None)
            _, s = block(img_in[i], s, *block_args, edit=rec, index=i, timesteps=inp["timesteps"])
            out.append(rec.entries[0].tensors["img_attn_out"])
    return out
