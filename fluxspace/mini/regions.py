"""The regions of flux-mini's local attributes: where flipping one can change pixels.

The layout is fixed, so each local attribute (attributes.LOCAL_FAMILIES) is drawn inside a known region
and flipping it changes no pixel outside `region(family, size)`, for any seed and any other attributes;
that is the ground truth of the edit benchmark. A region is the layer's footprint, drawn with the mask
pen over every value, style, face shape and a grid over the nuisance that shapes the layer, grown by
what the grid and the seed's shift can move it and by the reach of the LANCZOS reduction.
"""

import itertools
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from einops import rearrange

from .attributes import FAMILIES, Attributes, check_family
from .pen import SUPERSAMPLE, Pen
from .render import EYE_GAP, FACE_SHAPES, SCALE, SHIFT, Nuisance, check_size, draw_local, place_head

LANCZOS_REACH = 3  # a change at one supersampled pixel moves output pixels at most 3 away (Lanczos a=3)
REGION_MARGIN = LANCZOS_REACH + 1  # pixels added around every region, one for safety

GRID = 5  # steps of scale and eye gap at which a region takes its layer's footprint
LEVER = 0.6  # a change ds of scale moves no local layer's point more than LEVER * ds (the chin: ~0.31 * ds)
# How far a layer may lie from its footprint at the nearest grid point (fraction of the side).
GRID_SLACK = LEVER * SCALE / (GRID - 1) + (EYE_GAP[1] - EYE_GAP[0]) * (1 + SCALE) / (2 * (GRID - 1))


def _footprint_nuisances(family: str) -> Iterator[Nuisance]:
    """A grid over the nuisance that changes a local layer's shape, at the centre (see _region)."""
    gaps = np.linspace(*EYE_GAP, GRID) if family == "eyewear" else [sum(EYE_GAP) / 2]
    for scale, eye_gap, hat_kind in itertools.product(
        np.linspace(1 - SCALE, 1 + SCALE, GRID), gaps, (0, 1) if family == "hat" else (0,)
    ):
        yield Nuisance(scale=float(scale), eye_gap=float(eye_gap), hat_kind=hat_kind)


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation by r pixels (a Chebyshev ball: LANCZOS is separable, so its reach is a square)."""
    out = np.zeros_like(mask)
    padded = np.pad(mask, r)
    h, w = mask.shape
    for axis_shift in range(2 * r + 1):  # rows, then columns: a square is a product of two segments
        out |= padded[axis_shift : axis_shift + h, r : r + w]
    rows, out = out, np.zeros_like(mask)
    padded = np.pad(rows, r)
    for axis_shift in range(2 * r + 1):
        out |= padded[r : r + h, axis_shift : axis_shift + w]
    return out


@lru_cache(maxsize=32)
def _region(family: str, size: int) -> np.ndarray:
    # Every pixel the layer can touch: its footprint over all its values, both styles, every face shape and
    # the grid of scale, eye gap and hat kind, with the face at the centre. Every part is placed relative
    # to the face centre, so the centre jitter is a pure shift: grow the supersampled footprint by it, by
    # the grid's slack and by one pixel of rasterisation; pool to output pixels; grow by the LANCZOS reach
    # and a pixel of safety.
    attrs = Attributes("light", "black", "round", "blue", "none", "none", "smile", "none", "flat")
    footprint = np.zeros((size * SUPERSAMPLE,) * 2, dtype=bool)
    for style, face, nu in itertools.product(FAMILIES["style"], FACE_SHAPES, _footprint_nuisances(family)):
        for value in FAMILIES[family]:
            pen = Pen(size, style, mask=True)
            draw_local(pen, family, value, place_head(face, nu), nu, attrs)
            footprint |= np.asarray(pen.image) > 0
    footprint = _grow(footprint, int(np.ceil((SHIFT + GRID_SLACK) * size * SUPERSAMPLE)) + 1)
    pooled = rearrange(footprint, "(h a) (w b) -> h w (a b)", a=SUPERSAMPLE, b=SUPERSAMPLE).any(-1)
    return _grow(pooled, REGION_MARGIN)


def region(family: str, size: int = 128) -> np.ndarray:
    """(size, size) bool: True where the local attribute `family` can change pixels, for any seed and any
    other attributes. Pixels outside it are identical whichever value the family takes."""
    check_family(family, kinds=("local",))
    check_size(size)
    return _region(family, int(size)).copy()
