"""FluxSpace editing (Dalva et al., arXiv 2412.09611), inside our model through the edit seam.

Notation (paper section 3): x image tokens, c base prompt, c_e edit prompt, phi the prior prompt.
A(x, c) is the image-token output of a double block's joint attention under text condition c.

Fine-grained edit, per double block and step (paper eq. 5-6):
    Delta = A(x, c_e) - proj_{A(x, phi)} A(x, c_e)          orthogonal to the prior, per token
    A_hat = A(x, c) + lambda_fine * M * Delta                 M: the concept's attention mask
Coarse edit of the pooled text vector (paper eq. 7):
    c'_e  = c_e_pool - proj_{c_pool} c_e_pool
    c_hat = (1 - lambda_coarse) * c_pool + lambda_coarse * c'_e

The prior and edit branches reuse the BASE image tokens (their q, k, v) and differ only in their text
streams, which we carry through the double blocks with the block's own weights. So a step costs one
plain forward plus, in the double blocks only, the branches' text streams and their attention.

Pure functions first (a test can call them alone), then the settings, then the per-step edit that
`Flux.forward(..., edit=...)` calls.
Letters: B batch, K branches (prior + concepts), T text tokens, N image tokens, C channels, H heads, D head dim.
"""

import math
from dataclasses import dataclass, field, replace

import torch
from einops import rearrange, repeat
from torch import Tensor

from flux_core.math import apply_rope, joint_attention
from flux_core.seam import DoubleBlockSite, ModVectors, SingleBlockSite

from .attention import attention_with_lse, merge_attention

# Floor of the projections' denominators (the paper leaves it unstated). A floor rather than an added
# eps keeps the projection exact: an edit branch equal to the prior gives Delta = 0 exactly.
PROJECTION_EPS = 1e-6
# Mask sharpness: M = [sigmoid(MASK_SHARPNESS * (m - 0.5)) >= tau_m] on min-max normalised attention.
MASK_SHARPNESS = 10.0
PROJECTIONS = ("after_proj", "before_proj")
COARSE_TARGETS = ("txt", "both", "global")


# ----------------------------------------------------------------------------------------------
# The math, as pure functions


def orthogonal_component(a_edit: Tensor, a_prior: Tensor, eps: float = PROJECTION_EPS) -> Tensor:
    """Delta = a_edit - (<a_edit, a_prior> / max(||a_prior||^2, eps)) a_prior, per token over channels.

    (..., N, C) each; computed and returned in float32.
    """
    a_edit, a_prior = a_edit.float(), a_prior.float()
    alpha = (a_edit * a_prior).sum(-1, keepdim=True) / a_prior.pow(2).sum(-1, keepdim=True).clamp_min(eps)  # (..., N, 1)
    return a_edit - alpha * a_prior  # (..., N, C)


def coarse_pooled(c_pool: Tensor, c_edit_pool: Tensor, lambda_coarse: float, eps: float = PROJECTION_EPS) -> Tensor:
    """c_hat = (1 - lambda) c + lambda (c_e - proj_c c_e). (B, C') each; float32."""
    c, ce = c_pool.float(), c_edit_pool.float()
    ce_orth = ce - ((ce * c).sum(-1, keepdim=True) / (c * c).sum(-1, keepdim=True).clamp_min(eps)) * c  # (B, C')
    return (1 - lambda_coarse) * c + lambda_coarse * ce_orth  # (B, C')


def keyword_attention(img_q: Tensor, txt_k: Tensor, positions: list[int], lse: Tensor | None = None) -> Tensor:
    """How much each image token attends to the keyword: (B, N) in float32.

    img_q (B, H, N, D) base image queries, txt_k (B, H, T, D) the edit branch's text keys, both after
    RoPE; softmax over the text keys only, mean over heads, mean over the keyword's sub-tokens.
    lse (B, H, N): the log-sum-exp over those text keys, when the caller has it already; then only
    the keyword's columns of the logits are computed.
    """
    scale = 1 / math.sqrt(img_q.shape[-1])
    if lse is None:
        logits = torch.einsum("bhnd,bhtd->bhnt", img_q.float(), txt_k.float()) * scale  # (B, H, N, T)
        probs = logits.softmax(dim=-1)[..., positions]  # (B, H, N, P)
    else:
        logits = torch.einsum("bhnd,bhpd->bhnp", img_q.float(), txt_k[:, :, positions].float()) * scale
        probs = (logits - lse[..., None]).exp()  # (B, H, N, P)
    return probs.mean(dim=1).mean(dim=-1)  # (B, N)


def concept_mask(attn: Tensor, tau_m: float) -> Tensor:
    """Hard mask M = [sigmoid(10 (m - 0.5)) >= tau_m], m = attn min-max normalised per sample. (B, N) float32.

    tau_m = 0 keeps every token; tau_m > sigmoid(5) ~ 0.9933 keeps none.
    """
    lo = attn.amin(dim=-1, keepdim=True)
    hi = attn.amax(dim=-1, keepdim=True)
    m = (attn - lo) / (hi - lo).clamp_min(1e-12)  # (B, N) in [0, 1]
    return (torch.sigmoid(MASK_SHARPNESS * (m - 0.5)) >= tau_m).float()


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Concept:
    """One thing to add (lambda_fine > 0) or remove (< 0), with its mask."""

    prompt: str  # the edit prompt c_e, typically a bare keyword: "eyeglasses"
    lambda_fine: float = 5.0
    tau_m: float = 0.5  # 0 = no mask
    mask_words: tuple[str, ...] | None = None  # words of `prompt` defining the mask; None = the whole prompt


@dataclass(frozen=True)
class EditSpec:
    """A FluxSpace edit. Defaults follow the unofficial implementation where the paper is silent.

    start / end: a step index (int, 0-based: the edit is on for start <= step < end) or a time t in
    [0, 1] (float: on while end < t_step <= start; t runs from 1 = noise to 0 = data).
    """

    concepts: tuple[Concept, ...] = ()
    lambda_coarse: float = 0.0
    coarse_prompt: str | None = None  # None: the concepts' prompts joined by ", "
    start: int | float = 0
    end: int | float | None = None
    blocks: tuple[int, ...] | None = None  # double blocks that edit; None = all
    prior_prompt: str = ""
    projection: str = "after_proj"  # project after the output projection (unofficial) or before it
    coarse_target: str = "txt"  # txt: text-stream modulation of the double blocks (unofficial); both; global

    @property
    def has_fine(self) -> bool:
        return any(c.lambda_fine != 0 for c in self.concepts)

    @property
    def has_coarse(self) -> bool:
        return self.lambda_coarse != 0

    @property
    def coarse_text(self) -> str:
        return self.coarse_prompt if self.coarse_prompt is not None else ", ".join(c.prompt for c in self.concepts)

    def is_active(self, step: int, t: float) -> bool:
        """Whether the edit is on at this step (index from 0, t the step's start time)."""
        if not (self.has_fine or self.has_coarse):
            return False
        after_start = step >= self.start if isinstance(self.start, int) else t <= self.start
        if self.end is None:
            return after_start
        before_end = step < self.end if isinstance(self.end, int) else t > self.end
        return after_start and before_end


def _is_real(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate(spec: EditSpec, num_steps: int, num_double_blocks: int) -> None:
    """Raise a ValueError naming the problem before any sampling starts."""
    if not spec.concepts and spec.coarse_prompt is None:
        raise ValueError("an edit needs at least one concept (an edit prompt), or a coarse_prompt for a coarse-only edit")
    for i, c in enumerate(spec.concepts):
        if not c.prompt.strip():
            raise ValueError(f"concept {i}: the edit prompt is empty; give a keyword such as 'eyeglasses'")
        if not _is_real(c.lambda_fine):
            raise ValueError(f"concept {i} ({c.prompt!r}): lambda_fine must be a finite number; got {c.lambda_fine!r}")
        if not _is_real(c.tau_m) or not 0 <= c.tau_m <= 1:
            raise ValueError(f"concept {i} ({c.prompt!r}): tau_m must be in [0, 1]; got {c.tau_m!r}")
        for w in c.mask_words or ():
            if w.strip().lower() not in c.prompt.lower() or not w.strip():
                raise ValueError(
                    f"concept {i}: mask word {w!r} does not occur in its edit prompt {c.prompt!r}; "
                    "mask words must be words of the edit prompt"
                )
    if not _is_real(spec.lambda_coarse):
        raise ValueError(f"lambda_coarse must be a finite number; got {spec.lambda_coarse!r}")
    if spec.coarse_prompt is not None and not spec.coarse_prompt.strip():
        raise ValueError("coarse_prompt is empty; give a prompt or leave it unset")
    for name in ("start", "end"):
        value = getattr(spec, name)
        if value is None and name == "end":
            continue
        if isinstance(value, bool) or not _is_real(value):
            raise ValueError(f"{name} must be a step index (int) or a time t in [0, 1] (float); got {value!r}")
        if isinstance(value, float) and not 0 <= value <= 1:
            raise ValueError(f"{name} given as a time must be in [0, 1]; got {value}")
        if isinstance(value, int) and not 0 <= value <= num_steps - (name == "start"):
            last = num_steps - 1
            raise ValueError(f"{name} step {value} is past the last step: {num_steps} steps run as steps 0..{last}")
    if spec.end is not None:
        s, e = spec.start, spec.end
        same_kind = isinstance(s, int) == isinstance(e, int)
        if same_kind and ((isinstance(s, int) and e <= s) or (isinstance(s, float) and e >= s)):
            raise ValueError(f"start ({s}) is not before end ({e}): the edit would never be on")
    if spec.blocks is not None:
        bad = [b for b in spec.blocks if not isinstance(b, int) or not 0 <= b < num_double_blocks]
        if bad or not spec.blocks:
            shown = str(bad[:5])[:-1] + (", ...]" if len(bad) > 5 else "]")
            raise ValueError(
                f"double block indices {shown} out of range; this model has double blocks 0..{num_double_blocks - 1}"
            )
    if spec.projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {spec.projection!r}; valid: {', '.join(PROJECTIONS)}")
    if spec.coarse_target not in COARSE_TARGETS:
        raise ValueError(f"unknown coarse_target {spec.coarse_target!r}; valid: {', '.join(COARSE_TARGETS)}")


# ----------------------------------------------------------------------------------------------
# Prompts encoded once per edit


@dataclass
class EncodedEdit:
    """The text side of an edit, encoded once: branch 0 is the prior, branch 1 + j concept j."""

    branch_txt: Tensor  # (K, T, C_t5) T5 embeddings of [prior, concept prompts...]
    coarse_pool: Tensor | None  # (1, C_clip) pooled CLIP vector of the coarse prompt
    positions: list[list[int]]  # per concept: T5 positions of its mask words in its own prompt


def encode_edit(spec: EditSpec, text) -> EncodedEdit:
    """Encode the prior, concept and coarse prompts with `text` (flux_core TextEncoders)."""
    prompts = [spec.prior_prompt] + [c.prompt for c in spec.concepts]
    branch_txt = text.encode_t5(prompts) if spec.has_fine else text.encode_t5(prompts[:1])[:0]
    coarse_pool = text.encode_clip([spec.coarse_text]) if spec.has_coarse else None
    positions = []
    for c in spec.concepts:
        words = c.mask_words or (c.prompt,)
        pos = sorted({p for w in words for p in text.word_token_positions(c.prompt, w)})
        positions.append(pos)
    return EncodedEdit(branch_txt, coarse_pool, positions)


# ----------------------------------------------------------------------------------------------
# The edit as the sampler and the model see it


@dataclass
class MaskLog:
    """Running sums of each concept's mask over the blocks and steps where it was applied."""

    sums: list[Tensor] = field(default_factory=list)  # per concept (B, N) float32
    count: int = 0

    def add(self, masks: list[Tensor]) -> None:
        if not self.sums:
            self.sums = [m.detach().float().clone() for m in masks]
        else:
            for s, m in zip(self.sums, masks, strict=True):
                s.add_(m.float())
        self.count += 1

    def mean(self) -> list[Tensor]:
        """Per concept, the fraction of applications in which each image token was inside the mask."""
        return [s / max(self.count, 1) for s in self.sums]


class FluxSpaceEditor:
    """Hands the sampler a per-step edit while the edit is on, and None otherwise (plain steps)."""

    def __init__(self, spec: EditSpec, encoded: EncodedEdit):
        self.spec = spec
        self.encoded = encoded
        self.masks = MaskLog()

    def at_step(self, step: int, t: float, num_steps: int):
        if not self.spec.is_active(step, t):
            return None  # the model runs exactly as without an edit
        return FluxSpaceStep(self.spec, self.encoded, self.masks)


class FluxSpaceStep:
    """The FluxSpace edit for one model forward (one sampling step). Implements flux_core.seam.Edit.

    In each double block, J = 1 + K conditions share the block's image q, k, v: the base text (row 0)
    and the K branches (prior, then the concepts). The image-image attention is computed once; each
    condition adds its own image-text part, merged exactly through log-sum-exp (attention.py).
    """

    def __init__(self, spec: EditSpec, encoded: EncodedEdit, masks: MaskLog | None = None):
        self.spec = spec
        self.encoded = encoded
        self.mask_log = masks
        self.streams: Tensor | None = None  # (B*K, T, C) the branches' text streams
        self.branch_vec: Tensor | None = None  # (B*K, C) their modulation vector
        self.edit_blocks: set[int] = set()
        self.last_block = -1

    # -- seam call 1: the modulation vectors, and the start of the branches' text streams
    def vectors(self, model, vec: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> ModVectors:
        spec, enc = self.spec, self.encoded
        vec_edit = vec
        if spec.has_coarse:
            c_hat = coarse_pooled(y, enc.coarse_pool.to(y.device).expand_as(y), spec.lambda_coarse)  # (B, C')
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
        J = 1 + K  # conditions: base, prior, concepts
        s = self.streams  # (B*K, T', C)
        if s.shape[1] != T:
            raise ValueError(f"edit prompts have {s.shape[1]} T5 tokens but the base prompt has {T}; encode both alike")
        mod1, mod2 = blk.txt_mod(self.branch_vec)  # each field (B*K, 1, C)
        q_s, k_s, v_s = blk.txt_attn.qkv_heads(mod1.modulate(blk.txt_norm1(s)))  # (B*K, H, T, D)
        q_s, k_s = apply_rope(q_s, k_s, repeat(site.pe[:, :, :T], "B one T d i j -> (B K) one T d i j", K=K))

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

        # Carry the branches' text streams through this block, as the base text stream is.
        s = s + mod1.gate * blk.txt_attn.proj(rearrange(txt_attn[:, 1:], "B K T C -> (B K) T C"))  # (B*K, T, C)
        self.streams = s + mod2.gate * blk.txt_mlp(mod2.modulate(blk.txt_norm2(s)))  # (B*K, T, C)
        txt_attn_out = blk.txt_attn.proj(txt_attn[:, 0])  # (B, T, C)

        if site.index not in self.edit_blocks:
            return blk.img_attn.proj(img_attn[:, 0]), txt_attn_out
        after = self.spec.projection == "after_proj"
        a = blk.img_attn.proj(img_attn) if after else img_attn  # (B, J, N, C): base, prior, concepts
        delta = orthogonal_component(a[:, 2:], a[:, 1:2])  # (B, K-1, N, C) float32

        lse_it = rearrange(lse_it, "(B J) H N -> B J H N", J=J)
        k_edit = rearrange(k_s, "(B K) H T D -> B K H T D", K=K)
        masks, a_hat = [], a[:, 0].float()  # (B, N, C)
        for j, concept in enumerate(self.spec.concepts):
            if concept.tau_m > 0:
                m = keyword_attention(img_q, k_edit[:, 1 + j], self.encoded.positions[j], lse_it[:, 2 + j])  # (B, N)
                mask = concept_mask(m, concept.tau_m)  # (B, N)
            else:
                mask = torch.ones(a_hat.shape[:2], device=a_hat.device)  # (B, N)
            masks.append(mask)
            a_hat = a_hat + concept.lambda_fine * mask[..., None] * delta[:, j]  # (B, N, C)
        if self.mask_log is not None:
            self.mask_log.add(masks)
        a_hat = a_hat.to(a.dtype)
        return (a_hat if after else blk.img_attn.proj(a_hat)), txt_attn_out

    def single_block(self, site: SingleBlockSite) -> Tensor:
        return site.attention()  # FluxSpace leaves the single-stream blocks alone


def with_scale(spec: EditSpec, lambda_fine: float | None = None, lambda_coarse: float | None = None) -> EditSpec:
    """The same edit with every concept's lambda_fine and/or lambda_coarse replaced (for sweeps)."""
    concepts = spec.concepts
    if lambda_fine is not None:
        concepts = tuple(replace(c, lambda_fine=lambda_fine) for c in concepts)
    return replace(spec, concepts=concepts, lambda_coarse=spec.lambda_coarse if lambda_coarse is None else lambda_coarse)
