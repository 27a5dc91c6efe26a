"""The FluxSpace edit inside the model: FluxSpaceSchedule hands the sampler each step's edit
(flux_core.seam.EditSchedule), FluxSpaceEdit is that edit for one forward (flux_core.seam.Edit).

The prior and edit branches reuse the BASE image tokens (their q, k, v) and differ only in their text
streams, which are carried through the double blocks with the block's own weights (section 3 of the
paper; the unofficial implementation does the same). So a step costs one plain forward plus, in the
double blocks only, the branches' text streams and their attention.

Letters: B batch, K branches (prior + concepts), J = 1 + K conditions (base first), T text tokens,
N image tokens, C channels, H heads, D head dim.
"""

from dataclasses import dataclass, field

import torch
from einops import rearrange, repeat
from torch import Tensor

from flux_core.math import apply_rope, joint_attention
from flux_core.seam import DoubleBlockSite, ModVectors, SingleBlockSite

from .attention import attention_with_lse, merge_attention
from .projection import (
    coarse_pooled,
    coarse_pooled_reference,
    concept_mask,
    concept_mask_reference,
    edit_direction,
    keyword_attention,
    keyword_attention_reference,
    orthogonal_component_reference,
)
from .spec import NO_POOLED_TEXT, EditSpec, EncodedEdit


@dataclass
class MaskLog:
    """Each concept's mask: running sums over the blocks and steps where it was applied, and, with
    keep=True, every block's masks for research: entries (step, block index, [per concept (B, N)])."""

    sums: list[Tensor] = field(default_factory=list)  # per concept (B, N) float32
    count: int = 0
    keep: bool = False
    step: int = -1  # set by FluxSpaceSchedule before each edited step
    entries: list[tuple[int, int, list[Tensor]]] = field(default_factory=list)

    # Eager under torch.compile: the lists and counts it keeps change every call and would become
    # guards that fail every step (flux_core/runtime/compile.py).
    @torch.compiler.disable
    def add(self, masks: list[Tensor], block: int = -1) -> None:
        if self.keep:
            self.entries.append((self.step, block, [m.detach().float().cpu().clone() for m in masks]))
        if not self.sums:
            self.sums = [m.detach().float().clone() for m in masks]
        else:
            for s, m in zip(self.sums, masks, strict=True):
                s.add_(m.float())
        self.count += 1

    def mean(self) -> list[Tensor]:
        """Per concept, the fraction of applications in which each image token was inside the mask."""
        return [s / max(self.count, 1) for s in self.sums]


class FluxSpaceSchedule:
    """Hands the sampler a per-step edit while the edit is on, and None otherwise (plain steps).

    Implements flux_core.seam.EditSchedule; `masks` collects every concept's mask as the run goes.
    The same schedule serves FLUX.1 (flux_core.sampling.denoise) and FLUX.2 (flux_core.flux2.sampling
    .denoise). n_generated: on Kontext / FLUX.2 with reference images, how many image tokens are
    generated (the references follow); only those are edited unless spec.edit_condition.
    """

    def __init__(self, spec: EditSpec, encoded: EncodedEdit, keep_masks: bool = False, n_generated: int | None = None):
        if spec.has_coarse and encoded.coarse_pool is None:  # encoded for FLUX.2: refused before any step
            raise ValueError(NO_POOLED_TEXT)
        self.spec = spec
        self.encoded = encoded
        self.masks = MaskLog(keep=keep_masks)
        self.n_generated = n_generated  # Kontext: the image tokens being generated (conditioning tokens follow)

    def at_step(self, step: int, t: float, num_steps: int) -> "FluxSpaceEdit | None":
        if not self.spec.is_active(step, t):
            return None  # the model runs exactly as without an edit
        self.masks.step = step
        return FluxSpaceEdit(self.spec, self.encoded, self.masks, self.n_generated)

    def mean_masks(self, grid: tuple[int, int]) -> list[Tensor]:
        """Per concept (h, w) on the CPU: the share of edited blocks x steps with each token in the
        mask (zeros where the edit never ran)."""
        count = len(self.spec.concepts)
        means = self.masks.mean() if self.masks.count else [torch.zeros(1, grid[0] * grid[1])] * count
        return [m[0].reshape(grid).cpu() for m in means]


class FluxSpaceEdit:
    """The FluxSpace edit for one model forward (one sampling step). Implements flux_core.seam.Edit.

    In each double block, J = 1 + K conditions share the block's image q, k, v: the base text (row 0)
    and the K branches (prior, then the concepts). The image-image attention is computed once; each
    condition adds its own image-text part, merged exactly through log-sum-exp (attention.py).

    On Kontext the image stream holds the generated tokens, then the conditioning image's
    (flux_core.sampling.Condition). n_generated: how many come first; the edit then moves only
    them, and the conditioning tokens are carried through as the plain model carries them, unless
    spec.edit_condition. Every image token still attends as in the plain model.
    """

    def __init__(self, spec: EditSpec, encoded: EncodedEdit, masks: MaskLog | None = None,
                 n_generated: int | None = None):  # fmt: skip
        self.spec = spec
        self.encoded = encoded
        self.mask_log = masks
        self.n_generated = None if spec.edit_condition else n_generated
        self.streams: Tensor | None = None  # (B*K, T, C) the branches' text streams
        self.branch_vec: Tensor | None = None  # (B*K, C) their modulation vector
        self.edit_blocks: set[int] = set()
        self.last_block = -1

    # -- seam call 1: the modulation vectors, and the start of the branches' text streams
    def vectors(self, model, vec: Tensor, timesteps: Tensor, y: Tensor | None, guidance: Tensor | None) -> ModVectors:
        spec, enc = self.spec, self.encoded
        vec_edit = vec
        if spec.has_coarse and y is None:  # FLUX.2 (y is None): the last guard, should the checks before be skipped
            raise ValueError(NO_POOLED_TEXT)
        if spec.has_coarse:
            c_edit = enc.coarse_pool.to(y.device).expand_as(y)  # (B, C')
            coarse = coarse_pooled_reference if spec.reference else coarse_pooled
            c_hat = coarse(y, c_edit, spec.lambda_coarse)  # (B, C')
            vec_edit = model.conditioning(timesteps, c_hat.to(y.dtype), guidance)  # (B, C)
        vecs = {
            "txt": ModVectors(img=vec, txt=vec_edit, out=vec),
            "both": ModVectors(img=vec_edit, txt=vec_edit, out=vec),
            "global": ModVectors(img=vec_edit, txt=vec_edit, out=vec_edit),
        }[spec.coarse_target]
        if spec.has_fine:
            self.edit_blocks = set(spec.blocks) if spec.blocks is not None else set(range(len(model.double_blocks)))
            self.last_block = max(self.edit_blocks)
            B, K = vec.shape[0], enc.branch_txt.shape[0]
            txt = model.txt_in(enc.branch_txt.to(device=vec.device, dtype=vec.dtype))  # (K, T, C)
            self.streams = repeat(txt, "K T C -> (B K) T C", B=B)
            # As the unofficial code: the prior's text stream is modulated by the plain vec, the edit
            # branches' by the text-stream vector (which carries the coarse edit).
            branch_vecs = torch.stack([vec] + [vecs.txt] * (K - 1), dim=1)  # (B, K, C)
            self.branch_vec = rearrange(branch_vecs, "B K C -> (B K) C")
        return vecs

    # -- seam call 2: the fine edit inside a double block
    def double_block(self, site: DoubleBlockSite) -> tuple[Tensor, Tensor]:
        if self.streams is None or site.index > self.last_block:
            return site.outputs()  # past the last edited block nothing else is needed
        blk, T, K = site.block, site.n_txt, self.encoded.branch_txt.shape[0]
        s = self.streams  # (B*K, T', C)
        if s.shape[1] != T:
            raise ValueError(f"edit prompts have {s.shape[1]} text tokens but the base prompt has {T}; encode both alike")
        # The text stream's modulation layer: the block's own txt_mod on FLUX.1, the model's shared
        # double_stream_modulation_txt on FLUX.2 (flux_core/seam.py DoubleBlockSite.txt_modulation).
        mod1, mod2 = site.txt_modulation(self.branch_vec)  # each field (B*K, 1, C)
        q_s, k_s, v_s = blk.txt_attn.qkv_heads(mod1.modulate(blk.txt_norm1(s)))  # (B*K, H, T, D)
        q_s, k_s = apply_rope(q_s, k_s, repeat(site.pe[:, :, :T], "B one T d i j -> (B K) one T d i j", K=K))

        attend = self._reference_attention if self.spec.reference else self._shared_attention
        img_attn, txt_attn, lse_it = attend(site, q_s, k_s, v_s)  # (B, J, N, C), (B, J, T, C), (B, J, H, N) | None

        # Carry the branches' text streams through this block, as the base text stream is.
        s = s + mod1.gate * blk.txt_attn.proj(rearrange(txt_attn[:, 1:], "B K T C -> (B K) T C"))  # (B*K, T, C)
        self.streams = s + mod2.gate * blk.txt_mlp(mod2.modulate(blk.txt_norm2(s)))  # (B*K, T, C)
        txt_attn_out = blk.txt_attn.proj(txt_attn[:, 0])  # (B, T, C)
        if site.index not in self.edit_blocks:
            return blk.img_attn.proj(img_attn[:, 0]), txt_attn_out

        after = self.spec.projection == "after_proj"
        a = blk.img_attn.proj(img_attn) if after else img_attn  # (B, J, N, C): base, prior, concepts
        k_edit = rearrange(k_s, "(B K) H T D -> B K H T D", K=K)
        img_q = site.q[:, :, T:]  # (B, H, N, D) base image queries
        if self.spec.reference:
            a_hat = self._reference_combine(a, img_q, k_edit, site.index)
        else:
            delta = edit_direction(a[:, 2:], a[:, 1:2], self.spec.prior_removal)  # (B, K-1, N, C) float32
            masks, a_hat = [], a[:, 0].float()  # (B, N, C)
            for j, concept in enumerate(self.spec.concepts):
                if concept.tau_m > 0:
                    m = keyword_attention(img_q, k_edit[:, 1 + j], self.encoded.positions[j], lse_it[:, 2 + j])  # (B, N)
                    mask = concept_mask(m, concept.tau_m)  # (B, N)
                else:
                    mask = torch.ones(a_hat.shape[:2], device=a_hat.device)  # (B, N)
                if self.n_generated is not None:  # Kontext: the conditioning tokens stay as they are
                    mask = torch.cat([mask[:, : self.n_generated], torch.zeros_like(mask[:, self.n_generated :])], dim=1)
                masks.append(mask)
                a_hat = a_hat + concept.lambda_fine * mask[..., None] * delta[:, j]  # (B, N, C)
            if self.mask_log is not None:  # the generated image's masks (its grid)
                n = self.n_generated if self.n_generated is not None else a_hat.shape[1]
                self.mask_log.add([m[:, :n] for m in masks], site.index)
            a_hat = a_hat.to(a.dtype)
        return (a_hat if after else blk.img_attn.proj(a_hat)), txt_attn_out

    def _shared_attention(self, site: DoubleBlockSite, q_s: Tensor, k_s: Tensor, v_s: Tensor):
        """All J conditions' attention with the image-image part computed once (exact log-sum-exp merge)."""
        T, K = site.n_txt, q_s.shape[0] // site.q.shape[0]
        J = 1 + K

        def with_base(base: Tensor, branch: Tensor) -> Tensor:  # -> (B*J, H, T, D), base first per sample
            branch = rearrange(branch, "(B K) H T D -> B K H T D", K=K)
            return rearrange(torch.cat((base[:, None], branch), dim=1), "B J H T D -> (B J) H T D")

        txt_q = with_base(site.q[:, :, :T], q_s)  # (B*J, H, T, D)
        txt_k = with_base(site.k[:, :, :T], k_s)
        txt_v = with_base(site.v[:, :, :T], v_s)
        img_q, img_k, img_v = site.q[:, :, T:], site.k[:, :, T:], site.v[:, :, T:]  # (B, H, N, D), shared

        # Image queries: the image-image part once, the image-text part per condition, merged exactly.
        o_ii, lse_ii = attention_with_lse(img_q, img_k, img_v)  # (B, H, N, D), (B, H, N)
        img_q_j = repeat(img_q, "B H N D -> (B J) H N D", J=J)
        o_it, lse_it = attention_with_lse(img_q_j, txt_k, txt_v)  # (B*J, H, N, D), (B*J, H, N)
        shared = (repeat(o_ii, "B H N D -> (B J) H N D", J=J), repeat(lse_ii, "B H N -> (B J) H N", J=J))
        img_attn = merge_attention([shared, (o_it, lse_it)]).to(site.q.dtype)  # (B*J, H, N, D)
        img_attn = rearrange(img_attn, "(B J) H N D -> B J N (H D)", J=J)  # (B, J, N, C)
        # Text queries of every condition: over their own text and the shared image tokens (T x (T+N), cheap).
        kv = [torch.cat((t, repeat(i, "B H N D -> (B J) H N D", J=J)), dim=2) for t, i in ((txt_k, img_k), (txt_v, img_v))]
        txt_attn = rearrange(joint_attention(txt_q, *kv), "(B J) T C -> B J T C", J=J)  # (B, J, T, C)
        return img_attn, txt_attn, rearrange(lse_it, "(B J) H N -> B J H N", J=J)

    def _reference_attention(self, site: DoubleBlockSite, q_s: Tensor, k_s: Tensor, v_s: Tensor):
        """As the unofficial code: the base from the plain kernel, each branch a full joint attention."""
        T, K = site.n_txt, q_s.shape[0] // site.q.shape[0]
        img = [repeat(x[:, :, T:], "B H N D -> (B K) H N D", K=K) for x in (site.q, site.k, site.v)]
        branch = joint_attention(*(torch.cat((t, i), dim=2) for t, i in zip((q_s, k_s, v_s), img, strict=True)))
        branch = rearrange(branch, "(B K) L C -> B K L C", K=K)  # (B, K, T+N, C)
        base_img, base_txt = site.attention()  # (B, N, C), (B, T, C)
        img_attn = torch.cat((base_img[:, None], branch[:, :, T:]), dim=1)  # (B, J, N, C)
        txt_attn = torch.cat((base_txt[:, None], branch[:, :, :T]), dim=1)  # (B, J, T, C)
        return img_attn, txt_attn, None

    def _reference_combine(self, a: Tensor, img_q: Tensor, k_edit: Tensor, block: int) -> Tensor:
        """A_hat with the unofficial code's arithmetic: model dtype, eps added, one concept, lambda > 0 only."""
        (concept,) = self.spec.concepts
        if concept.lambda_fine <= 0:  # the unofficial code skips the fine edit then
            return a[:, 0]
        delta = orthogonal_component_reference(a[:, 2], a[:, 1])  # (B, N, C)
        m = keyword_attention_reference(img_q, k_edit[:, 1], self.encoded.positions[0])  # (B, N)
        mask = concept_mask_reference(m, concept.tau_m)[..., None]  # (B, N, 1) bool
        if self.mask_log is not None:
            self.mask_log.add([mask[..., 0].float()], block)
        return a[:, 0] + concept.lambda_fine * (mask * delta)

    def single_block(self, site: SingleBlockSite) -> Tensor:
        return site.attention()  # FluxSpace leaves the single-stream blocks alone


