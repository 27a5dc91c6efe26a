"""The flux-mini renderer: a cartoon face drawn from an attribute set and a seed.

Every image is `render(attrs, seed)`: the attributes fix what is drawn, the seed only fixes nuisance
(face position and size within a couple of pixels, eye spacing and size, hair and hat cut, colour shades,
shirt colour, blush). The layout is fixed, so each local attribute is drawn inside a known region
(regions.py). Shapes are drawn with the pen (pen.py) at SUPERSAMPLE x the size and reduced with LANCZOS
(anti-aliasing).

Coordinates are fractions of the image side (x right, y down), so the geometry does not depend on size.
Layers, back to front: background, hair (back), shirt, neck, ears, face, blush, hair (fringe), eyes,
brows, nose, beard, mouth, eyewear, hat. An accessory is only ever drawn over what is below it.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from .attributes import Attributes
from .pen import Pen, mix

# ----------------------------------------------------------------------------------------------
# Colours (RGB). Named values are far apart; the seed shifts brightness by at most SHADE_JITTER.

SKIN = {"light": (247, 218, 195), "medium": (226, 178, 136), "tan": (186, 130, 86), "dark": (110, 72, 48)}
HAIR = {"black": (34, 30, 32), "brown": (112, 66, 36), "blond": (234, 192, 96), "red": (196, 74, 34)}
BACKGROUND = {"blue": (122, 172, 236), "green": (140, 208, 140), "pink": (246, 168, 200), "grey": (172, 172, 178)}  # fmt: skip
SHIRTS = ((70, 92, 160), (200, 72, 72), (232, 232, 232), (92, 92, 98), (238, 190, 72), (60, 142, 122))
HATS = ((36, 56, 132), (102, 46, 132), (36, 106, 66), (26, 110, 122))
HAT_BAND = (238, 228, 200)
EYE_WHITE, PUPIL, MOUTH, TEETH = (252, 252, 252), (30, 26, 30), (48, 10, 20), (250, 250, 246)
FRAME, LENS, BLUSH = (36, 32, 34), (24, 24, 30), (240, 120, 130)
LIGHT_FRAME = (236, 230, 214)  # eyeglasses on tan and dark skin: dark frames would vanish there
SHADE_JITTER = 10

# ----------------------------------------------------------------------------------------------
# Layout. FACE_SHAPES: half-width, half-height, superellipse exponent (2 = ellipse, larger = squarer).

FACE_CENTRE = (0.5, 0.54)
FACE_SHAPES = {"round": (0.25, 0.27, 2.0), "oval": (0.22, 0.30, 2.0), "square": (0.24, 0.28, 3.4)}
SHIFT = 0.012  # face centre jitter, each axis (1.5 px at 128)
SCALE = 0.03  # face size jitter
EYE_GAP = (0.095, 0.11)  # half the distance between the eyes, before scaling
STROKE = 0.026  # mouth line width


@dataclass(frozen=True)
class Nuisance:
    """What the seed decides. Geometry first (these bound the regions), then looks."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    eye_gap: float = 0.1
    eye_size: float = 1.0
    look: float = 0.0  # pupils' horizontal offset
    brow_tilt: float = 0.0
    hair_cut: int = 0  # 0 short, 1 long, 2 bob
    fringe: int = 0  # 0 straight, 1 swept left, 2 swept right, 3 spiky
    hat_kind: int = 0  # 0 brimmed, 1 beanie
    hat_colour: int = 0
    shirt: int = 0
    blush: bool = False
    skin_shade: int = 0
    hair_shade: int = 0
    background_shade: int = 0


def _unit(seed: int, name: str) -> float:
    """A uniform number in [0, 1) from (seed, name): each nuisance has its own stream, so adding one
    never shifts the others, and renders do not depend on numpy's generator versions."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def nuisance(seed: int) -> Nuisance:
    def u(name, lo=-1.0, hi=1.0):
        return lo + (hi - lo) * _unit(seed, name)

    def pick(name, n):
        return int(_unit(seed, name) * n)

    return Nuisance(
        dx=u("dx") * SHIFT, dy=u("dy") * SHIFT, scale=1 + u("scale") * SCALE, eye_gap=u("eye_gap", *EYE_GAP),
        eye_size=u("eye_size", 0.9, 1.1), look=u("look") * 0.008, brow_tilt=u("brow_tilt") * 0.012,
        hair_cut=pick("hair_cut", 3), fringe=pick("fringe", 4), hat_kind=pick("hat_kind", 2),
        hat_colour=pick("hat_colour", len(HATS)), shirt=pick("shirt", len(SHIRTS)), blush=u("blush") > 0,
        skin_shade=round(u("skin_shade") * SHADE_JITTER), hair_shade=round(u("hair_shade") * SHADE_JITTER),
        background_shade=round(u("background_shade") * SHADE_JITTER),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Drawing


def _superellipse(cx, cy, rx, ry, n, count=96, start=np.pi / 2):
    """Outline points, counter-clockwise on screen from `start` (pi/2 = the bottom point)."""
    t = start + np.linspace(0, 2 * np.pi, count, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = cx + rx * np.sign(c) * np.abs(c) ** (2 / n)
    y = cy + ry * np.sign(s) * np.abs(s) ** (2 / n)
    return list(zip(x.tolist(), y.tolist(), strict=True))


def _arc(cx, cy, rx, ry, t0, t1, count=25):
    """Points of an elliptic arc from angle t0 to t1 (y down: pi/2 is the bottom)."""
    t = np.linspace(t0, t1, count)
    return list(zip((cx + rx * np.cos(t)).tolist(), (cy + ry * np.sin(t)).tolist(), strict=True))


def _box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _above(points, level):
    """The contiguous run of outline points (started at the bottom) above `level(x)`."""
    return [(x, y) for x, y in points if y <= level(x)]


def _shade(rgb, delta):
    return tuple(int(np.clip(c + delta, 0, 255)) for c in rgb)


@dataclass(frozen=True)
class Head:
    """Where the face is for one (face shape, nuisance): every part is placed relative to it."""

    cx: float
    cy: float
    rx: float
    ry: float
    n: float
    s: float  # scale for the features

    @property
    def top(self):
        return self.cy - self.ry

    @property
    def eye_y(self):
        return self.cy - 0.035 * self.s

    @property
    def mouth_y(self):
        return self.cy + 0.15 * self.s


def place_head(face: str, nu: Nuisance) -> Head:
    rx, ry, n = FACE_SHAPES[face]
    return Head(FACE_CENTRE[0] + nu.dx, FACE_CENTRE[1] + nu.dy, rx * nu.scale, ry * nu.scale, n, nu.scale)


def _draw_hair_back(pen, h, nu, colour):
    outline = _superellipse(h.cx, h.cy - 0.02, h.rx + 0.05, h.ry + 0.045, h.n)
    cut = {0: h.cy + 0.02, 1: h.cy, 2: h.cy + 0.14}[nu.hair_cut]
    points = _above(outline, lambda x: cut)
    if nu.hair_cut == 1:  # long: straight down to the shoulders
        points += [(points[-1][0], h.cy + 0.3), (points[0][0], h.cy + 0.3)]
    pen.polygon(points, colour, "hatch")


def _draw_body(pen, h, nu, skin):
    shirt = _superellipse(h.cx, 1.06, 0.36, 0.2, 2.5)
    pen.polygon(shirt, SHIRTS[nu.shirt])
    w = 0.075 * h.s
    pen.polygon(_box(h.cx - w, h.cy, h.cx + w, 0.9), _shade(skin, -18))  # neck
    for side in (-1, 1):
        pen.ellipse(h.cx + side * h.rx, h.cy, 0.04 * h.s, 0.06 * h.s, _shade(skin, -8))


def _draw_fringe(pen, h, nu, colour):
    base = h.top + 0.08
    level = {
        0: lambda x: base,
        1: lambda x: base + 0.2 * (h.cx - x),
        2: lambda x: base - 0.2 * (h.cx - x),
        3: lambda x: base - 0.01 + 0.03 * abs(np.sin((x - h.cx) * 40)),
    }[nu.fringe]
    outline = _superellipse(h.cx, h.cy - 0.02, h.rx + 0.05, h.ry + 0.045, h.n, count=180)
    top = _above(outline, level)
    xs = np.linspace(top[-1][0], top[0][0], 61)  # right end back to the left end along the fringe
    pen.polygon(top + [(x, level(x)) for x in xs.tolist()], colour, "hatch")


def _draw_features(pen, h, nu, skin, hair):
    for side in (-1, 1):
        ex = h.cx + side * nu.eye_gap * h.s
        pen.ellipse(ex, h.eye_y, 0.042 * h.s * nu.eye_size, 0.036 * h.s * nu.eye_size, EYE_WHITE)
        px = ex + nu.look
        pen.ellipse(px, h.eye_y, 0.021 * h.s, 0.021 * h.s, PUPIL, "solid")
        pen.ellipse(px + 0.007, h.eye_y - 0.007, 0.006, 0.006, EYE_WHITE, "tint")
        by, tilt = h.eye_y - 0.065 * h.s, nu.brow_tilt * side * 0.5
        pen.stroke([(ex - 0.04 * h.s, by + tilt), (ex + 0.04 * h.s, by - tilt)], _shade(hair, -30), 0.017)
    y, w = h.cy + 0.045 * h.s, 0.02 * h.s
    pen.stroke([(h.cx - w, y), (h.cx, y + 0.012), (h.cx + w, y)], _shade(skin, -50), 0.012)  # nose


def _draw_beard(pen, h, colour):
    top = h.cy + 0.06 * h.s
    # The face outline a little outside the face, below `top`: from the right, round the chin, to the left.
    outer = _superellipse(h.cx, h.cy, h.rx + 0.018, h.ry + 0.018, h.n, 120, start=0.0)
    right = sorted((p for p in outer if p[1] >= top and p[0] >= h.cx), key=lambda p: p[1])
    left = sorted((p for p in outer if p[1] >= top and p[0] < h.cx), key=lambda p: -p[1])
    # A U-shaped notch round the mouth, so the mouth stays visible on any beard.
    hy, hrx, hry = h.mouth_y - 0.005, 0.11 * h.s, 0.068 * h.s
    notch = [(h.cx - hrx, top)] + _arc(h.cx, hy, hrx, hry, np.pi, 0) + [(h.cx + hrx, top)]
    pen.polygon(right + left + [(left[-1][0], top)] + notch + [(right[0][0], top)], colour, "hatch")
    moustache = [(h.cx - 0.09 * h.s, hy - 0.04 * h.s), (h.cx + 0.09 * h.s, hy - 0.04 * h.s)]
    moustache += [(h.cx + 0.06 * h.s, hy - 0.065 * h.s), (h.cx - 0.06 * h.s, hy - 0.065 * h.s)]
    pen.polygon(moustache, colour, "hatch")


def _draw_mouth(pen, h, mouth):
    my, w = h.mouth_y, 0.085 * h.s
    if mouth == "smile":  # an open D: flat top, round bottom, a row of teeth
        top, depth, teeth = my - 0.018 * h.s, 0.06 * h.s, 0.016 * h.s
        pen.polygon(_arc(h.cx, top, w, depth, 0, np.pi), MOUTH, "solid")
        inset = w * (1 - np.sqrt(1 - (teeth / depth) ** 2))  # where the teeth's lower edge meets the arc
        pen.polygon([(h.cx - w, top), (h.cx + w, top), (h.cx + w - inset, top + teeth), (h.cx - w + inset, top + teeth)], TEETH, "tint")  # fmt: skip
    elif mouth == "frown":  # an arch
        pen.stroke(_arc(h.cx, my + 0.025 * h.s, w, 0.045 * h.s, np.pi, 2 * np.pi), MOUTH, STROKE)
    else:  # neutral: a straight line
        pen.stroke([(h.cx - 0.85 * w, my), (h.cx + 0.85 * w, my)], MOUTH, STROKE)


def _draw_eyewear(pen, h, nu, eyewear, skin):
    sun = eyewear == "sunglasses"
    colour = FRAME if sun or skin in ("light", "medium") else LIGHT_FRAME
    y, width = h.eye_y, (0.02 if sun else 0.015)
    half_w, half_h = (0.075, 0.056) if sun else (0.064, 0.064)
    for side in (-1, 1):
        ex = h.cx + side * nu.eye_gap * h.s
        temple = [(ex + side * half_w, y - 0.01), (h.cx + side * h.rx * 0.985, y - 0.012)]  # to the ear
        pen.stroke(temple, colour, width * 0.8)
        radius = 0.03 if sun else half_w
        pen.frame(
            ex - half_w, y - half_h, ex + half_w, y + half_h, radius, colour, width, LENS if sun else None
        )
        if sun:
            pen.stroke([(ex - 0.035, y - 0.02), (ex - 0.015, y - 0.035)], EYE_WHITE, 0.01, "tint")  # glint
    inner = nu.eye_gap * h.s - half_w
    pen.stroke([(h.cx - inner, y - 0.012), (h.cx, y - 0.022), (h.cx + inner, y - 0.012)], colour, width)


def _draw_hat(pen, h, nu):
    colour = HATS[nu.hat_colour]
    brim = h.top + 0.035 * h.s
    if nu.hat_kind == 0:  # brimmed: crown, band, brim
        cw = h.rx * 0.8
        pen.polygon(_above(_superellipse(h.cx, brim, cw, 0.2, 4.0), lambda x: brim), colour)
        pen.polygon(_box(h.cx - cw, brim - 0.05, h.cx + cw, brim - 0.015), HAT_BAND)
        pen.ellipse(h.cx, brim, h.rx + 0.1, 0.03, _shade(colour, 25))
    else:  # beanie: pom-pom, dome, turned-up cuff
        pen.ellipse(h.cx, brim - 0.2, 0.035, 0.035, HAT_BAND)
        pen.polygon(_above(_superellipse(h.cx, brim, h.rx + 0.03, 0.19, 2.2), lambda x: brim), colour)
        pen.polygon(
            _box(h.cx - h.rx - 0.035, brim - 0.035, h.cx + h.rx + 0.035, brim + 0.03), _shade(colour, 30)
        )


def draw_local(pen, family: str, value: str, h: Head, nu: Nuisance, attrs: Attributes):
    """One local attribute's layer. The region builder calls this alone to take its footprint."""
    hair = _shade(HAIR[attrs.hair], nu.hair_shade)
    if family == "beard" and value == "beard":
        _draw_beard(pen, h, _shade(hair, -12))
    elif family == "mouth":
        _draw_mouth(pen, h, value)
    elif family == "eyewear" and value != "none":
        _draw_eyewear(pen, h, nu, value, attrs.skin)
    elif family == "hat" and value == "hat":
        _draw_hat(pen, h, nu)


def _draw(pen: Pen, attrs: Attributes, nu: Nuisance) -> None:
    h = place_head(attrs.face, nu)
    skin = _shade(SKIN[attrs.skin], nu.skin_shade)
    hair = _shade(HAIR[attrs.hair], nu.hair_shade)
    background = _shade(BACKGROUND[attrs.background], nu.background_shade)
    pen.draw.rectangle([0, 0, pen.px, pen.px], fill=pen.colour(background, "tint"))
    _draw_hair_back(pen, h, nu, hair)
    _draw_body(pen, h, nu, skin)
    pen.polygon(_superellipse(h.cx, h.cy, h.rx, h.ry, h.n), skin)
    if nu.blush:
        for side in (-1, 1):
            x, y = h.cx + side * 0.13 * h.s, h.cy + 0.06 * h.s
            pen.ellipse(x, y, 0.035, 0.025, mix(skin, BLUSH, 0.35), "tint")
    _draw_fringe(pen, h, nu, hair)
    _draw_features(pen, h, nu, skin, hair)
    for family in ("beard", "mouth", "eyewear", "hat"):
        draw_local(pen, family, getattr(attrs, family), h, nu, attrs)


def check_size(size) -> None:
    if not isinstance(size, int | np.integer) or size < 32:
        raise ValueError(f"size must be an integer >= 32 (pixels a side), got {size!r}")


def render(attrs: Attributes, seed: int, size: int = 128) -> Image.Image:
    """The face for `attrs` with the nuisance of `seed`, as a size x size RGB image. Deterministic."""
    if not isinstance(attrs, Attributes):
        raise TypeError(f"attrs must be an Attributes, got {type(attrs).__name__}")
    check_size(size)
    pen = Pen(size, attrs.style)
    _draw(pen, attrs, nuisance(int(seed)))
    return pen.image.resize((size, size), Image.LANCZOS)


def render_batch(attrs: Sequence[Attributes], seeds: Sequence[int], size: int = 128) -> np.ndarray:
    """(B, H, W, 3) uint8 renders."""
    if len(attrs) != len(seeds):
        raise ValueError(f"got {len(attrs)} attribute sets but {len(seeds)} seeds; give one seed per image")
    return np.stack([np.asarray(render(a, s, size)) for a, s in zip(attrs, seeds, strict=True)])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the model's image range."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    x = torch.from_numpy(rearrange(images, "b h w c -> b c h w").astype(np.float32))  # (B, 3, H, W)
    return x / 127.5 - 1.0
