"""The edit seam: one typed object threaded through `Flux.forward(..., edit=...)`.

Editing methods and inspection tools see the model here and nowhere else: no hooks, no patched
modules, no state on modules. With `edit=None` none of this runs and the model is the plain one,
bit for bit.

Two call points:
  1. `Flux.forward` asks `edit.vectors(...)` once for the modulation vectors (coarse edits change
     the pooled text vector, see FluxSpace section 3.3).
  2. Every block calls `edit.double_block(site)` / `edit.single_block(site)` at its one marked
     point, after attention and before the gated residual add, with everything it computed.
Sites hold views of the block's tensors: an edit that wants to keep one must clone it.

Letters: B batch, T text tokens, N image tokens, L = T + N, C channels, H heads, D head dim.
"""

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from .layers import ModulationOut


@dataclass(frozen=True)
class ModVectors:
    """The modulation vectors of one forward: (B, C) each. The plain model uses one `vec` for all."""

    img: Tensor  # image-stream modulation of the double blocks
    txt: Tensor  # text-stream modulation of the double blocks
    out: Tensor  # single blocks and final layer


@dataclass(frozen=True)
class DoubleBlockSite:
    """Everything a double-stream block computed up to its marked point."""

    index: int
    block: nn.Module  # the DoubleStreamBlock: its weights, for edits that run extra streams
    timesteps: Tensor  # (B,) t in [0, 1]
    img: Tensor  # (B, N, C) block input
    txt: Tensor  # (B, T, C) block input
    vecs: ModVectors
    img_mod: ModulationOut  # attention modulation of the image stream (shift, scale, gate)
    txt_mod: ModulationOut
    img_modulated: Tensor  # (B, N, C) (1 + scale) * LN(img) + shift
    txt_modulated: Tensor  # (B, T, C)
    q: Tensor  # (B, H, L, D) after QK-norm and RoPE, [txt ; img]
    k: Tensor  # (B, H, L, D)
    v: Tensor  # (B, H, L, D)
    pe: Tensor  # (B, 1, L, D/2, 2, 2)
    txt_attn: Tensor  # (B, T, C) attention output before the output projection
    img_attn: Tensor  # (B, N, C)
    txt_attn_out: Tensor  # (B, T, C) after `txt_attn.proj`
    img_attn_out: Tensor  # (B, N, C) after `img_attn.proj`

    @property
    def n_txt(self) -> int:
        return self.txt.shape[1]


@dataclass(frozen=True)
class SingleBlockSite:
    """Everything a single-stream block computed up to its marked point."""

    index: int
    block: nn.Module
    timesteps: Tensor  # (B,)
    x: Tensor  # (B, L, C) block input, [txt ; img]
    n_txt: int
    mod: ModulationOut
    x_modulated: Tensor  # (B, L, C)
    q: Tensor  # (B, H, L, D) after QK-norm and RoPE
    k: Tensor
    v: Tensor
    pe: Tensor
    attn: Tensor  # (B, L, C) attention output, before `linear2`
    mlp: Tensor  # (B, L, mlp_hidden) MLP branch before its activation


class Edit(Protocol):
    """What `Flux.forward` needs of an edit. A do-nothing edit returns its inputs unchanged."""

    def vectors(self, model: nn.Module, vec: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> ModVectors:
        """Called once per forward, before the blocks; may start per-forward state."""
        ...

    def double_block(self, site: DoubleBlockSite) -> tuple[Tensor, Tensor]:
        """Return (img_attn_out, txt_attn_out), each after its output projection, to be gated in."""
        ...

    def single_block(self, site: SingleBlockSite) -> Tensor:
        """Return the attention output (B, L, C) that enters `linear2` beside the MLP branch."""
        ...
