"""Instruction-edit pairs of the flux-mini domain: the training data of flux-mini-kontext.

A pair is a render (the conditioning image), an instruction ("add a hat", "make the person smile"),
and the same face rendered with exactly that one change: the same attributes but one family, the
same render seed, so every pixel outside the changed part is the same (render.py draws each local
family inside its own region; the style and hair colour change what they colour, nothing else).
Held-out faces (attributes.is_held_out) never appear in training pairs; the benchmark edits them.

Instructions are drawn from a few phrasings per change (INSTRUCTIONS), so the model learns the
change, not one sentence.
"""

from dataclasses import dataclass

import numpy as np

from .attributes import FAMILIES, Attributes, check_split, sample_attributes

# (family, value it becomes) -> phrasings. A change to "none" is a removal of what was there.
INSTRUCTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("eyewear", "eyeglasses"): ("add eyeglasses", "put glasses on the person", "give them eyeglasses"),
    ("eyewear", "sunglasses"): ("add sunglasses", "put sunglasses on the person", "give them sunglasses"),
    ("eyewear", "none"): ("remove the glasses", "take the glasses off", "no glasses"),
    ("hat", "hat"): ("add a hat", "put a hat on the person", "give them a hat"),
    ("hat", "none"): ("remove the hat", "take the hat off", "no hat"),
    ("mouth", "smile"): ("make the person smile", "add a smile", "make them smile"),
    ("mouth", "frown"): ("make the person frown", "add a frown", "make them frown"),
    ("mouth", "neutral"): ("make the mouth neutral", "a neutral mouth", "stop smiling"),
    ("beard", "beard"): ("add a beard", "give them a beard", "grow a beard"),
    ("beard", "none"): ("remove the beard", "shave the beard", "no beard"),
    ("style", "sketch"): ("make it a sketch", "turn it into a sketch", "sketch style"),
    ("style", "flat"): ("make it flat colour", "turn it into flat colour", "flat colour style"),
    **{("hair", v): (f"make the hair {v}", f"dye the hair {v}", f"{v} hair") for v in FAMILIES["hair"]},
    **{("background", v): (f"make the background {v}", f"a {v} background", f"change the background to {v}")
       for v in FAMILIES["background"]},
}  # fmt: skip
EDITED_FAMILIES = tuple(dict.fromkeys(f for f, _ in INSTRUCTIONS))


@dataclass(frozen=True)
class EditPair:
    """A face, an instruction, and the face with the instruction carried out."""

    source: Attributes
    target: Attributes
    seed: int  # the render seed of both
    instruction: str

    @property
    def family(self) -> str:
        (changed,) = [f for f in FAMILIES if getattr(self.source, f) != getattr(self.target, f)]
        return changed


def changes(attrs: Attributes) -> list[tuple[str, str]]:
    """Every (family, new value) an instruction can ask of this face: a different value of an edited family."""
    return [(f, v) for f, v in INSTRUCTIONS if getattr(attrs, f) != v]


def draw_pairs(n: int, seed: int, split: str = "train") -> list[EditPair]:
    """n pairs: a face of `split` (both its attribute sets in it), a change, one of its phrasings."""
    check_split(split)
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    rng = np.random.default_rng([seed, 2])
    pairs = []
    while len(pairs) < n:
        source = sample_attributes(rng, split)
        family, value = changes(source)[rng.integers(len(changes(source)))]
        target = source.with_(family, value)
        render_seed = int(rng.integers(2**31))
        phrasings = INSTRUCTIONS[(family, value)]
        instruction = phrasings[rng.integers(len(phrasings))]
        if split != "all" and sample_split(target) != split:
            continue  # the edited face must belong to the split too
        pairs.append(EditPair(source, target, render_seed, instruction))
    return pairs


def sample_split(attrs: Attributes) -> str:
    from .attributes import is_held_out

    return "held_out" if is_held_out(attrs) else "train"
