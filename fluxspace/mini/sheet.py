"""The contact sheet of the flux-mini domain in docs/mini_domain.md (docs/mini_domain_samples.png).

Regenerate the figure with `sample_sheet().save("docs/mini_domain_samples.png")`.
"""

import numpy as np
from PIL import Image

from .attributes import LOCAL_FAMILIES, Attributes, sample_attributes
from .regions import region
from .render import render


def sample_sheet(seed: int = 0, size: int = 128) -> Image.Image:
    """Four rows of random faces; two faces with each local attribute toggled in turn and then the sketch
    style; the four regions (red) over a face. Columns of 8, 2-pixel gaps."""
    rng = np.random.default_rng(seed)
    tiles = [render(sample_attributes(rng), int(rng.integers(2**31)), size) for _ in range(32)]
    for base, face_seed in (
        (Attributes("medium", "brown", "oval", "blue", "none", "none", "neutral", "none", "flat"), 3),
        (Attributes("dark", "black", "square", "green", "none", "none", "neutral", "none", "flat"), 11),
    ):
        toggles = [("eyewear", "eyeglasses"), ("eyewear", "sunglasses"), ("hat", "hat"), ("mouth", "smile")]
        toggles += [("mouth", "frown"), ("beard", "beard"), ("style", "sketch")]
        tiles += [render(base, face_seed, size)] + [
            render(base.with_(f, v), face_seed, size) for f, v in toggles
        ]
    face = render(
        Attributes("light", "red", "round", "grey", "none", "none", "smile", "none", "flat"), 5, size
    )
    for family in LOCAL_FAMILIES:
        tint = np.asarray(face).astype(np.float32)
        tint[region(family, size)] = 0.5 * tint[region(family, size)] + 0.5 * np.array([230, 30, 30])
        tiles.append(Image.fromarray(tint.round().astype(np.uint8)))
    gap, cols = 2, 8
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * (size + gap) - gap, rows * (size + gap) - gap), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * (size + gap), (i // cols) * (size + gap)))
    return sheet
