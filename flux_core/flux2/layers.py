"""What the FLUX.2 transformer does differently from FLUX.1's layers, and nothing else.

Mirrors the layer classes of `src/flux2/model.py` (black-forest-labs/flux2). Everything that is the
same math as FLUX.1 is imported from `flux_core.layers` / `flux_core.math`, not repeated: RoPE over
the id axes (`EmbedND`, now 4 axes), the timestep sinusoid, QK RMSNorm, the attention parameters,
the (shift, scale, gate) modulation and the final adaptive LayerNorm. FLUX.2 builds them without
bias. What is new:
  - SwiGLU MLPs: the first linear gives 2x the hidden width, SiLU(first half) * second half.
  - The modulations are shared: three layers for the whole model (`double_stream_modulation_img`,
    `double_stream_modulation_txt`, `single_stream_modulation`), applied once per forward to the
    time (+ guidance) vector and handed to every block (`Flux2Modulations`).
  - No pooled text vector: `vec` is time_in(t) [+ guidance_in(g)] alone.

Letters: B batch, L tokens, C channels (hidden size).
"""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ModulationOut
from ..seam import ModVectors


def swiglu(x: Tensor) -> Tensor:
    """SiLU(x1) * x2 with [x1 | x2] the two halves of the last axis (flux2/model.py `SiLUActivation`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return F.silu(x1) * x2


class SwiGLU(nn.Module):
    """The parameter-free gate between the two MLP linears (so the keys stay `.0` and `.2`)."""

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)


def swiglu_mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    # Keys `.0` (C -> 2 * mlp_hidden: value and gate rows in one matrix) and `.2`, no bias.
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * mlp_hidden_dim, bias=False),
        SwiGLU(),
        nn.Linear(mlp_hidden_dim, hidden_size, bias=False),
    )


@dataclass(frozen=True, kw_only=True)
class Flux2Modulations:
    """The modulations of one forward, computed once from the ModVectors and shared by every block.

    flux2/model.py calls the three shared Modulation layers once, before the blocks; every double
    block gets the same (attention, MLP) sets per stream and every single block the same set. The
    layers themselves travel along for the edit seam (`DoubleBlockSite.txt_modulation`): an edit that
    runs extra text streams modulates them with another vector through the same layer.
    """

    vecs: ModVectors  # the (B, C) vectors these came from
    img: tuple[ModulationOut, ModulationOut]  # double blocks, image stream: (attention, MLP)
    txt: tuple[ModulationOut, ModulationOut]  # double blocks, text stream
    single: ModulationOut  # single blocks
    img_layer: nn.Module  # double_stream_modulation_img
    txt_layer: nn.Module  # double_stream_modulation_txt
