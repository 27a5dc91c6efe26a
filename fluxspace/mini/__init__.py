"""flux-mini: a small Flux trained on a procedural domain of captioned cartoon faces (issue 4).

The domain: attributes.py (families, values, kinds, the held-out split, sampling), render.py (a face
from attributes and a seed, drawn with pen.py), regions.py (where each local attribute can change
pixels), sheet.py (the contact sheet of docs/mini_domain.md); captions.py: captions.
The trained model ships in weights/flux-mini/ (built by `python -m fluxspace.mini.build`) and is the
default model of `fluxspace generate | edit | sweep` and `fluxspace.load_models()`: the library finds
it there itself (fluxspace.models.FLUX_MINI_DIR), without importing this package.
"""

from .attributes import (
    FAMILIES,
    KIND,
    LOCAL_FAMILIES,
    N_COMBINATIONS,
    Attributes,
    all_combinations,
    is_held_out,
    sample_attributes,
)
from .regions import region
from .render import render, render_batch, to_tensor

__all__ = [
    "FAMILIES",
    "KIND",
    "LOCAL_FAMILIES",
    "N_COMBINATIONS",
    "Attributes",
    "all_combinations",
    "is_held_out",
    "region",
    "render",
    "render_batch",
    "sample_attributes",
    "to_tensor",
]
