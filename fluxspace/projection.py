"""The pure math of FluxSpace (Dalva et al., arXiv 2412.09611, section 3), one function per formula.

    Delta = A_e - (<A_e, A_phi> / ||A_phi||^2) A_phi          per image token, over channels (eq. 5)
    c_hat = (1 - l) c + l (c_e - proj_c c_e)                   pooled text vectors (eq. 7)
    M     = [sigmoid(10 (m - 0.5)) >= tau_m]                   m: min-max normalised keyword attention

Ours run in float32 with a floor on the denominators (exact when A_e == A_phi). The `*_reference`
variants reproduce the unofficial implementation's arithmetic (model dtype, +1e-8), for the
reference mode (docs/fluxspace_reference_notes.md).
Letters: B batch, H heads, N image tokens, T text tokens, P keyword tokens, C channels, D head dim.
"""

import math

import torch
from torch import Tensor

# Floor of the projections' denominators (the paper leaves it unstated). A floor rather than an added
# eps keeps the projection exact: an edit branch equal to the prior gives Delta = 0 exactly.
PROJECTION_EPS = 1e-6
# Mask sharpness: M = [sigmoid(MASK_SHARPNESS * (m - 0.5)) >= tau_m] on min-max normalised attention.
MASK_SHARPNESS = 10.0
# The unofficial implementation adds this to every denominator, in the model dtype.
REFERENCE_EPS = 1e-8




def orthogonal_component(a_edit: Tensor, a_prior: Tensor, eps: float = PROJECTION_EPS) -> Tensor:
    """Delta = a_edit - (<a_edit, a_prior> / max(||a_prior||^2, eps)) a_prior, per token over channels.

    (..., N, C) each; computed and returned in float32.
    """
    a_edit, a_prior = a_edit.float(), a_prior.float()
    alpha = (a_edit * a_prior).sum(-1, keepdim=True) / a_prior.pow(2).sum(-1, keepdim=True).clamp_min(eps)  # (..., N, 1)
    return a_edit - alpha * a_prior  # (..., N, C)


def edit_direction(a_edit: Tensor, a_prior: Tensor, prior_removal: str = "orthogonal") -> Tensor:
    """Delta of the fine edit, float32: orthogonal_component (the paper), or for ablations the plain
    difference a_edit - a_prior, or a_edit itself ("none"). Shapes as orthogonal_component's."""
    if prior_removal == "orthogonal":
        return orthogonal_component(a_edit, a_prior)
    if prior_removal == "difference":
        return a_edit.float() - a_prior.float()
    if prior_removal == "none":
        return a_edit.float()
    raise ValueError(f"unknown prior_removal {prior_removal!r}; valid: orthogonal, difference, none")


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



def orthogonal_component_reference(a_edit: Tensor, a_prior: Tensor) -> Tensor:
    """As the unofficial code: in the inputs' dtype, eps added. (..., N, C)."""
    alpha = (a_edit * a_prior).sum(-1, keepdim=True) / ((a_prior * a_prior).sum(-1, keepdim=True) + REFERENCE_EPS)
    return a_edit - alpha * a_prior


def coarse_pooled_reference(c_pool: Tensor, c_edit_pool: Tensor, lambda_coarse: float) -> Tensor:
    """As the unofficial code: in the inputs' dtype, eps added. (B, C')."""
    ce = c_edit_pool.to(c_pool.dtype)
    alpha = (ce * c_pool).sum(-1, keepdim=True) / ((c_pool * c_pool).sum(-1, keepdim=True) + REFERENCE_EPS)
    return (1 - lambda_coarse) * c_pool + lambda_coarse * (ce - alpha * c_pool)


def keyword_attention_reference(img_q: Tensor, txt_k: Tensor, positions: list[int]) -> Tensor:
    """As the unofficial code: full softmax over the text keys in the model dtype. (B, N)."""
    logits = (img_q @ txt_k.transpose(-1, -2)) * (1 / math.sqrt(img_q.shape[-1]))  # (B, H, N, T)
    probs = logits.softmax(dim=-1).mean(dim=1)  # (B, N, T)
    return probs[..., positions].mean(dim=-1)  # (B, N)


def concept_mask_reference(attn: Tensor, tau_m: float) -> Tensor:
    """As the unofficial code: min-max with eps added, in the model dtype; hard mask (B, N)."""
    lo = attn.amin(dim=-1, keepdim=True)
    hi = attn.amax(dim=-1, keepdim=True)
    m = (attn - lo) / (hi - lo + REFERENCE_EPS)
    return torch.sigmoid(MASK_SHARPNESS * (m - 0.5)) >= tau_m
