"""The flux-mini domain's attributes: families, their values and kinds, the held-out split, sampling.

Every image of the domain is drawn from an `Attributes` (a value for every family) and a seed
(render.py). The kind of a family says what flipping it changes: an identity family (who is drawn)
or the global style changes the whole face; a local family is drawn inside its own fixed region
(regions.py), which is the ground truth of the edit benchmark.
"""

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

FAMILIES: dict[str, tuple[str, ...]] = {
    # identity: who is drawn
    "skin": ("light", "medium", "tan", "dark"),
    "hair": ("black", "brown", "blond", "red"),
    "face": ("round", "oval", "square"),
    "background": ("blue", "green", "pink", "grey"),
    # local: editable, each drawn inside its own fixed region
    "eyewear": ("none", "eyeglasses", "sunglasses"),
    "hat": ("none", "hat"),
    "mouth": ("smile", "frown", "neutral"),
    "beard": ("none", "beard"),
    # global: changes every pixel
    "style": ("flat", "sketch"),
}
KIND: dict[str, str] = {
    "skin": "identity", "hair": "identity", "face": "identity", "background": "identity",
    "eyewear": "local", "hat": "local", "mouth": "local", "beard": "local",
    "style": "global",
}  # fmt: skip
LOCAL_FAMILIES = tuple(f for f in FAMILIES if KIND[f] == "local")
N_COMBINATIONS = int(np.prod([len(v) for v in FAMILIES.values()]))
HELD_OUT_PER_MILLE = 100  # ~10% of combinations never appear in training (see is_held_out)
SPLITS = ("all", "train", "held_out")


@dataclass(frozen=True)
class Attributes:
    """One point of the domain: a value for every family in FAMILIES."""

    skin: str
    hair: str
    face: str
    background: str
    eyewear: str
    hat: str
    mouth: str
    beard: str
    style: str

    def __post_init__(self):
        for name, valid in FAMILIES.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not a valid value; valid: {', '.join(valid)}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def with_(self, family: str, value: str) -> "Attributes":
        """A copy with one family changed (the edit benchmark's ground-truth pair)."""
        check_family(family)
        return replace(self, **{family: value})


assert tuple(f.name for f in fields(Attributes)) == tuple(FAMILIES), "Attributes fields must match FAMILIES"


def check_family(family: str, kinds: tuple[str, ...] = ("identity", "local", "global")) -> None:
    """Raise unless `family` is a family of one of `kinds` (the error lists the valid ones)."""
    valid = [f for f in FAMILIES if KIND[f] in kinds]
    if family not in valid:
        raise ValueError(f"unknown family {family!r} here; valid: {', '.join(valid)}")


def check_split(split: str) -> None:
    """Raise unless `split` is one of SPLITS (sample_attributes and data.draw_attributes share it)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def all_combinations() -> Iterator[Attributes]:
    """Every attribute set, N_COMBINATIONS of them, in a fixed order."""
    for values in itertools.product(*FAMILIES.values()):
        yield Attributes(*values)


def is_held_out(attrs: Attributes) -> bool:
    """True for the ~10% of combinations kept out of training (prompt adherence is measured on them).

    A hash of the combination, not Python's hash(), so the split is the same in every process and version.
    """
    key = ";".join(f"{k}={v}" for k, v in attrs.as_dict().items()).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 1000 < HELD_OUT_PER_MILLE


def sample_attributes(rng: np.random.Generator, split: str = "all") -> Attributes:
    """Uniform over each family's values (independently), restricted to a split by rejection."""
    check_split(split)
    while True:
        attrs = Attributes(*(values[rng.integers(len(values))] for values in FAMILIES.values()))
        if split == "all" or is_held_out(attrs) == (split == "held_out"):
            return attrs
