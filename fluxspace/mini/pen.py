"""The pen of the flux-mini renderer: shapes in fraction coordinates on a supersampled canvas, in two styles.

Coordinates are fractions of the image side (x right, y down), so the geometry does not depend on size.
Shapes are drawn at SUPERSAMPLE x the size with PIL; render.py reduces the canvas with LANCZOS
(anti-aliasing). The "flat" style fills shapes with their colour; the "sketch" style draws ink outlines
over a pale wash of it. The same pen with mask=True draws a layer's footprint (regions.py).
"""

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4
PAPER, INK = (250, 248, 242), (36, 36, 46)  # the sketch style: ink outlines on paper
SKETCH_WASH = 0.45  # sketch fills are this much of the flat colour over paper, so identity stays readable
HATCH_WASH, HATCH_PERIOD, HATCH_WIDTH = 0.25, 0.032, 0.012  # sketch hair and beard: coloured strokes
OUTLINE = 0.012  # sketch outline width


class Pen:
    """Draws shapes in fraction coordinates on a supersampled canvas, in one of the two styles.

    kind="area": flat colour without outline / sketch: a pale wash of the colour with an ink outline.
    kind="solid": the colour / ink (pupils, dark lenses, the open mouth).
    kind="tint": the colour / its wash, no outline (shading details).
    kind="hatch": the colour / diagonal strokes of the colour over a light wash, ink outline (hair, beard).
    mask=True draws everything in 255 on an "L" canvas: the footprint used to build the regions.
    """

    def __init__(self, size: int, style: str, mask: bool = False):
        self.px = size * SUPERSAMPLE
        self.style, self.mask = style, mask
        self.image = Image.new("L" if mask else "RGB", (self.px, self.px), 0)
        self.draw = ImageDraw.Draw(self.image)

    def colour(self, rgb, kind):
        if self.mask:
            return 255
        if self.style == "flat":
            return tuple(rgb)
        if kind == "solid":
            return INK
        return tuple(round(p + SKETCH_WASH * (c - p)) for c, p in zip(rgb, PAPER, strict=True))

    def _outline(self, kind):
        if self.style == "sketch" and kind == "area":
            return (255 if self.mask else INK), max(1, round(OUTLINE * self.px))
        return None, 0

    def polygon(self, points, rgb, kind="area"):
        outline, width = self._outline("area" if kind == "hatch" else kind)
        xy = [(x * self.px, y * self.px) for x, y in points]
        if kind == "hatch" and self.style == "sketch" and not self.mask:
            # Coloured-pencil hatching over a light wash, clipped to the shape, then the ink outline.
            shape = Image.new("L", self.image.size, 0)
            ImageDraw.Draw(shape).polygon(xy, fill=255)
            self.draw.polygon(xy, fill=mix(PAPER, rgb, HATCH_WASH))
            hatch = (np.asarray(shape) > 0) & _hatching(self.px)
            self.image.paste(tuple(rgb), mask=Image.fromarray(hatch.astype(np.uint8) * 255))
            self.draw.polygon(xy, outline=outline, width=width)
            return
        self.draw.polygon(xy, fill=self.colour(rgb, kind), outline=outline, width=width)

    def ellipse(self, cx, cy, rx, ry, rgb, kind="area"):
        outline, width = self._outline(kind)
        box = [(cx - rx) * self.px, (cy - ry) * self.px, (cx + rx) * self.px, (cy + ry) * self.px]
        self.draw.ellipse(box, fill=self.colour(rgb, kind), outline=outline, width=width)

    def frame(self, x0, y0, x1, y1, radius, rgb, width, lens=None):
        """A rounded-rectangle frame (a circle when radius is half the side), `lens` filling it."""
        fill = None if lens is None else self.colour(lens, "solid")
        box = [x0 * self.px, y0 * self.px, x1 * self.px, y1 * self.px]
        w = max(1, round(width * self.px))
        self.draw.rounded_rectangle(
            box, radius * self.px, fill=fill, outline=self.colour(rgb, "solid"), width=w
        )

    def stroke(self, points, rgb, width, kind="solid"):
        """A polyline with round joints and caps."""
        colour, w = self.colour(rgb, kind), max(1, round(width * self.px))
        xy = [(x * self.px, y * self.px) for x, y in points]
        self.draw.line(xy, fill=colour, width=w, joint="curve")
        for x, y in (xy[0], xy[-1]):
            self.draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=colour)


@lru_cache(maxsize=8)
def _hatching(px: int) -> np.ndarray:
    """(px, px) bool diagonal stripes, HATCH_PERIOD apart and HATCH_WIDTH wide (fractions of the side)."""
    y, x = np.mgrid[0:px, 0:px]
    return (x + y) % max(2, round(HATCH_PERIOD * px)) < max(1, round(HATCH_WIDTH * px))


def mix(a, b, t):
    return tuple(round(x + t * (y - x)) for x, y in zip(a, b, strict=True))
