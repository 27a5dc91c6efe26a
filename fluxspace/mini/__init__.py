"""flux-mini: a small Flux trained on a procedural domain of captioned cartoon faces (issue 4).

domain.py: attributes, the renderer and the regions of the local attributes; captions.py: captions.
"""

from .domain import (
    FAMILIES,
    KIND,
    LOCAL_FAMILIES,
    N_COMBINATIONS,
    Attributes,
    all_combinations,
    is_held_out,
    region,
    render,
    render_batch,
    sample_attributes,
    to_tensor,
)

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
