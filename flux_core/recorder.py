"""A recorder on the edit seam: keeps per-block tensors, changes nothing.

    rec = Recorder(keep=("img_attn_out",), attention_maps=True)
    out = model(..., edit=rec)               # output identical to model(...)
    rec.entries[0].tensors["img_attn_out"]   # (B, N, C) of double block 0, first forward

Entries come in block order (all double blocks, then all single blocks) for each forward call.
Nothing is stored on the modules; the recorder owns everything it keeps.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .seam import DoubleBlockSite, ModVectors, SingleBlockSite

DOUBLE_FIELDS = ("img_attn", "txt_attn", "img_attn_out", "txt_attn_out", "img_modulated", "txt_modulated", "q", "k", "v")
SINGLE_FIELDS = ("attn", "mlp", "x_modulated", "q", "k", "v")


@dataclass
class Record:
    kind: str  # "double" or "single"
    index: int  # block index within its kind
    forward: int  # which forward call (0, 1, ...) of this recorder
    t: Tensor  # (B,) the timesteps of that call
    n_txt: int
    tensors: dict[str, Tensor] = field(default_factory=dict)


def attention_map(q: Tensor, k: Tensor) -> Tensor:
    """Head-averaged attention probabilities softmax(q k^T / sqrt(D)). (B, H, L, D) -> (B, L, L), float32."""
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    return logits.softmax(dim=-1).mean(dim=1)  # (B, L, L)


class Recorder:
    """Keeps the named site tensors of every block (cloned, on the CPU unless told otherwise).

    keep: names from DOUBLE_FIELDS / SINGLE_FIELDS (a name a block kind lacks is skipped there).
    attention_maps: also keep the head-averaged attention map of each block (B, L, L).
    blocks: restrict to ("double", i) / ("single", i) pairs; None keeps every block.
    """

    def __init__(self, keep=("img_attn_out", "attn"), attention_maps: bool = False, blocks=None, device="cpu"):
        unknown = set(keep) - set(DOUBLE_FIELDS) - set(SINGLE_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown recorder fields {sorted(unknown)}; valid: double {DOUBLE_FIELDS}, single {SINGLE_FIELDS}"
            )
        self.keep = tuple(keep)
        self.attention_maps = attention_maps
        self.blocks = None if blocks is None else {tuple(b) for b in blocks}
        self.device = device
        self.entries: list[Record] = []
        self._forward = -1

    def at_step(self, step: int, t: float, num_steps: int) -> "Recorder":
        """For `denoise(..., edit=recorder)`: record every step (entries carry `forward` = step)."""
        return self

    def vectors(self, model: nn.Module, vec: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> ModVectors:
        self._forward += 1
        return ModVectors(img=vec, txt=vec, out=vec)

    def _record(self, kind: str, site, fields, computed: dict) -> None:
        if self.blocks is not None and (kind, site.index) not in self.blocks:
            return
        tensors = {}
        for name in self.keep:
            if name in fields:
                value = computed[name]() if name in computed else getattr(site, name)
                tensors[name] = value.detach().to(self.device, copy=True)
        if self.attention_maps:
            tensors["attention_map"] = attention_map(site.q, site.k).to(self.device)
        t = site.timesteps.detach().cpu().clone() if site.timesteps is not None else torch.empty(0)
        self.entries.append(Record(kind, site.index, self._forward, t, site.n_txt, tensors))

    # Eager under torch.compile: `entries` grows every call, which a traced call would guard on
    # and recompile for (flux_core/runtime/compile.py).
    @torch.compiler.disable
    def double_block(self, site: DoubleBlockSite) -> tuple[Tensor, Tensor]:
        computed = {
            "img_attn": lambda: site.attention()[0],
            "txt_attn": lambda: site.attention()[1],
            "img_attn_out": lambda: site.outputs()[0],
            "txt_attn_out": lambda: site.outputs()[1],
        }
        self._record("double", site, DOUBLE_FIELDS, computed)
        return site.outputs()

    @torch.compiler.disable
    def single_block(self, site: SingleBlockSite) -> Tensor:
        self._record("single", site, SINGLE_FIELDS, {"attn": site.attention})
        return site.attention()

    def select(self, kind: str | None = None, forward: int | None = None) -> list[Record]:
        """Entries of one block kind and/or one forward call, in block order."""
        return [
            e for e in self.entries if (kind is None or e.kind == kind) and (forward is None or e.forward == forward)
        ]
