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

This file holds the edit as the user states it (settings, validation, prompt encoding, timing);
projection.py the formulas; step.py what runs inside the model at each step.
Letters: B batch, K branches (prior + concepts), T text tokens, N image tokens, C channels, H heads, D head dim.
"""

import math
from dataclasses import dataclass

from torch import Tensor

from flux_core.flux2.conditioner import Flux2TextEncoder

PROJECTIONS = ("after_proj", "before_proj")
COARSE_TARGETS = ("txt", "both", "global")
# What the edit direction keeps of the edit branch's attention output A_e, given the prior's A_phi:
# the paper's component orthogonal to A_phi, or (ablations) the plain difference, or A_e itself.
PRIOR_REMOVALS = ("orthogonal", "difference", "none")
# FLUX.2 (flux_core/flux2) has no pooled text vector for the coarse edit (eq. 7) to move; said the same
# way wherever an edit meets a FLUX.2 model: validate, encode_edit, FluxSpaceSchedule, the edit itself.
NO_POOLED_TEXT = (
    "FluxSpace's coarse edit (lambda_coarse) moves the pooled text vector, and this model has none "
    "(FLUX.2 modulates by time and guidance only): set lambda_coarse=0 and edit with the fine edit"
)


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
    prior_removal: str = "orthogonal"  # Delta = A_e - alpha A_phi (paper); "difference": A_e - A_phi; "none": A_e
    # Reproduce the unofficial implementation (docs/fluxspace_reference_notes.md): its arithmetic in
    # the model dtype, full attention per branch, one concept, lambda_fine > 0 only, and its keyword
    # lookup, which keeps a single T5 token (the one holding the first occurrence, in the edit prompt,
    # of the keyword's last character).
    reference: bool = False
    # Kontext models: also edit the conditioning image's tokens (default: only the generated image's).
    edit_condition: bool = False

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


def validate(spec: EditSpec, num_steps: int, num_double_blocks: int, pooled_text: bool = True) -> None:
    """Raise a ValueError naming the problem before any sampling starts.

    pooled_text: whether the model has a pooled text vector (FLUX.1) or not (FLUX.2: no coarse edit).
    """
    if spec.has_coarse and not pooled_text:
        raise ValueError(NO_POOLED_TEXT)
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
    if spec.prior_removal not in PRIOR_REMOVALS:
        raise ValueError(f"unknown prior_removal {spec.prior_removal!r}; valid: {', '.join(PRIOR_REMOVALS)}")
    if spec.reference and spec.prior_removal != "orthogonal":
        raise ValueError("reference mode reproduces the unofficial code, which removes the prior orthogonally; "
                         f"got prior_removal={spec.prior_removal!r}")  # fmt: skip
    if spec.reference and len(spec.concepts) != 1:
        raise ValueError(f"reference mode reproduces the unofficial code, which takes exactly one concept; got {len(spec.concepts)}")
    if spec.coarse_target not in COARSE_TARGETS:
        raise ValueError(f"unknown coarse_target {spec.coarse_target!r}; valid: {', '.join(COARSE_TARGETS)}")


# ----------------------------------------------------------------------------------------------
# Prompts encoded once per edit


@dataclass
class EncodedEdit:
    """The text side of an edit, encoded once: branch 0 is the prior, branch 1 + j concept j."""

    branch_txt: Tensor  # (K, T, C_t) text embeddings of [prior, concept prompts...] (T5; FLUX.2: its LLM)
    coarse_pool: Tensor | None  # (1, C_clip) pooled CLIP vector of the coarse prompt; None on FLUX.2
    positions: list[list[int]]  # per concept: token positions of its mask words in its own prompt


def encode_edit(spec: EditSpec, text) -> EncodedEdit:
    """Encode the prior, concept and coarse prompts with `text`.

    text: FLUX.1's flux_core TextEncoders (T5 for the branches, CLIP for the coarse prompt) or FLUX.2's
    Flux2TextEncoder (one LLM for the branches; no pooled vector, so no coarse edit). Keyword positions
    index the sequence the model sees: T5's tokens, or FLUX.2's chat-templated tokens.
    """
    flux2 = isinstance(text, Flux2TextEncoder)
    if flux2 and spec.has_coarse:
        raise ValueError(NO_POOLED_TEXT)
    if flux2 and spec.reference:
        raise ValueError("reference mode reproduces the unofficial FLUX.1 code (its T5 keyword lookup); "
                         "FLUX.2 has no such reference: set reference=False")  # fmt: skip
    encode = text if flux2 else text.encode_t5
    prompts = [spec.prior_prompt] + [c.prompt for c in spec.concepts]
    branch_txt = encode(prompts) if spec.has_fine else encode(prompts[:1])[:0]
    coarse_pool = text.encode_clip([spec.coarse_text]) if spec.has_coarse else None
    positions = []
    for c in spec.concepts:
        words = c.mask_words or (c.prompt,)
        if spec.reference:
            positions.append(reference_token_position(text.t5_tokenizer, c.prompt, words[0]))
        else:
            positions.append(sorted({p for w in words for p in text.word_token_positions(c.prompt, w)}))
    return EncodedEdit(branch_txt, coarse_pool, positions)


def reference_token_position(tokenizer, edit_prompt: str, keyword: str) -> list[int]:
    """The unofficial code's keyword lookup, bug included (notes, section 4).

    It loops over the CHARACTERS of the keyword and keeps only the last one's result: the T5 tokens
    overlapping the first occurrence, in the edit prompt, of the keyword's last character.
    """
    ch = keyword[-1]
    if ch not in edit_prompt:
        raise ValueError(f"reference lookup: character {ch!r} of {keyword!r} does not occur in the edit prompt {edit_prompt!r}")
    start = edit_prompt.index(ch)
    offsets = tokenizer(edit_prompt, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offsets) if b > start and a < start + 1]
