"""The edit seam: one typed object threaded through `Flux.forward(..., edit=...)`.

Editing methods and inspection tools see the model here and nowhere else: no hooks, no patched
modules, no state on modules. With `edit=None` none of this runs and the model is the plain one,
bit for bit.

Two call points:
  1. `Flux.forward` asks `edit.vectors(...)` once for the modulation vectors (coarse edits change
     the pooled text vector, FluxSpace section 3.3). FLUX.2 (`flux2.Flux2`) calls it with the same
     signature but `y=None`: it has no pooled text vector, its `vec` is time_in(t) + guidance_in(g)
     only, and the three ModVectors feed its three shared modulations (flux2/model.py).
  2. Every block calls `edit.double_block(site)` / `edit.single_block(site)` at its one marked
     point, where q, k and v (normed, rotated) are ready, and uses the attention outputs the edit
     returns. `site.attention()` / `site.outputs()` compute the plain ones on request (and only
     once), so an edit that computes attention its own way never pays for the plain path.
Sites hold views of the block's tensors: an edit that wants to keep one must clone it. They are
built with keyword arguments only, and every pair of streams comes in one order: (img, txt).
The same sites serve FLUX.1 and FLUX.2 blocks. Where the two differ (FLUX.1 blocks own `img_mod` /
`txt_mod`; FLUX.2 shares one modulation layer per stream across all double blocks), an edit that
modulates extra streams asks the site (`site.txt_modulation(vec)`), never the block.

A sampler asks an `EditSchedule` for each step's edit (`at_step`), so an edit can switch on and off
in time; None means a plain step.

Letters: B batch, T text tokens, N image tokens, L = T + N, C channels, H heads, D head dim.
"""

from dataclasses import dataclass, field, replace
from typing import Protocol

from torch import Tensor, nn

from .layers import ModulationOut
from .math import joint_attention


@dataclass(frozen=True, kw_only=True)
class ModVectors:
    """The modulation vectors of one forward: (B, C) each. The plain model uses one `vec` for all."""

    img: Tensor  # image-stream modulation of the double blocks
    txt: Tensor  # text-stream modulation of the double blocks
    out: Tensor  # single blocks and final layer


@dataclass(frozen=True, kw_only=True)
class DoubleBlockSite:
    """Everything a double-stream block computed up to its marked point."""

    index: int
    block: nn.Module  # the DoubleStreamBlock: its weights, for edits that run extra streams
    timesteps: Tensor | None  # (B,) t in [0, 1]
    img: Tensor  # (B, N, C) block input
    txt: Tensor  # (B, T, C) block input
    vecs: ModVectors
    img_mod: ModulationOut  # attention modulation of the image stream (shift, scale, gate)
    txt_mod: ModulationOut
    # vec (B, C) -> (attention, MLP) ModulationOut of each stream, for edits that run extra streams:
    # FLUX.1 the block's own `img_mod` / `txt_mod`, FLUX.2 the model's shared
    # `double_stream_modulation_img` / `_txt`. None only for sites built by older callers.
    img_modulation: nn.Module | None = None
    txt_modulation: nn.Module | None = None
    img_modulated: Tensor  # (B, N, C) (1 + scale) * LN(img) + shift
    txt_modulated: Tensor  # (B, T, C)
    q: Tensor  # (B, H, L, D) after QK-norm and RoPE, [txt ; img]
    k: Tensor  # (B, H, L, D)
    v: Tensor  # (B, H, L, D)
    pe: Tensor  # (B, 1, L, D/2, 2, 2)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_txt(self) -> int:
        return self.txt.shape[1]

    def attention(self) -> tuple[Tensor, Tensor]:
        """The plain joint attention before the output projections: (img_attn (B, N, C), txt_attn (B, T, C))."""
        if "attention" not in self._cache:
            attn = joint_attention(self.q, self.k, self.v)  # (B, L, C), [txt ; img]
            self._cache["attention"] = (attn[:, self.n_txt :], attn[:, : self.n_txt])
        return self._cache["attention"]

    def outputs(self) -> tuple[Tensor, Tensor]:
        """The plain attention outputs after the projections: (img_attn_out (B, N, C), txt_attn_out (B, T, C))."""
        if "outputs" not in self._cache:
            img_attn, txt_attn = self.attention()
            self._cache["outputs"] = (self.block.img_attn.proj(img_attn), self.block.txt_attn.proj(txt_attn))
        return self._cache["outputs"]

    def with_outputs(self, img_attn_out: Tensor, txt_attn_out: Tensor) -> "DoubleBlockSite":
        """The same site reporting other outputs (what an earlier edit returned), for chaining."""
        return replace(self, _cache={**self._cache, "outputs": (img_attn_out, txt_attn_out)})


@dataclass(frozen=True, kw_only=True)
class SingleBlockSite:
    """Everything a single-stream block computed up to its marked point."""

    index: int
    block: nn.Module
    timesteps: Tensor | None  # (B,)
    x: Tensor  # (B, L, C) block input, [txt ; img]
    n_txt: int
    mod: ModulationOut
    x_modulated: Tensor  # (B, L, C)
    q: Tensor  # (B, H, L, D) after QK-norm and RoPE
    k: Tensor
    v: Tensor
    pe: Tensor
    mlp: Tensor  # (B, L, mlp_hidden) MLP branch before its activation
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def attention(self) -> Tensor:
        """The plain attention output (B, L, C), before `linear2`."""
        if "attention" not in self._cache:
            self._cache["attention"] = joint_attention(self.q, self.k, self.v)
        return self._cache["attention"]

    def with_attention(self, attn: Tensor) -> "SingleBlockSite":
        return replace(self, _cache={**self._cache, "attention": attn})


class Edit(Protocol):
    """What `Flux.forward` needs of an edit. A do-nothing edit returns `site.outputs()` / `site.attention()`."""

    def vectors(
        self, model: nn.Module, vec: Tensor, timesteps: Tensor, y: Tensor | None, guidance: Tensor | None
    ) -> ModVectors:
        """Called once per forward, before the blocks; may start per-forward state.

        y: the pooled text vector (B, C') on FLUX.1, None on FLUX.2, which has none.
        """
        ...

    def double_block(self, site: DoubleBlockSite) -> tuple[Tensor, Tensor]:
        """Return (img_attn_out, txt_attn_out), each after its output projection, to be gated in."""
        ...

    def single_block(self, site: SingleBlockSite) -> Tensor:
        """Return the attention output (B, L, C) that enters `linear2` beside the MLP branch."""
        ...


class EditSchedule(Protocol):
    """What a sampler needs of an edit that can change from step to step (`denoise(..., edit=...)`).

    FluxSpace switches on and off in time; a Recorder records every step. step counts from 0 over
    the run's `num_steps`; t is the step's start time (1 = noise, 0 = data).
    """

    def at_step(self, step: int, t: float, num_steps: int) -> Edit | None:
        """The edit for this step's forward, or None for a plain step."""
        ...
