"""Images in and out: tensors <-> PIL, and PNG files written atomically with their parameters.

`atomic_file` (from flux_core/atomic.py, importable from here) is how every output file of the
project is written (PNGs, benchmark JSON and tables): a temporary file beside the target, renamed
over it once complete.

Every PNG we write carries the settings that made it in a `fluxspace` text chunk (JSON), plus a
human-readable `parameters` chunk, so an image found on disk can be reproduced.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from flux_core.atomic import FileSet, atomic_file

METADATA_KEY = "fluxspace"


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) images in [-1, 1] -> PIL RGB images (values clamped, rounded to uint8)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image -> (1, 3, H, W) float32 in [-1, 1]."""
    a = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))  # (H, W, 3)
    return (a.permute(2, 0, 1)[None] / 127.5) - 1.0


def save_png(image: Image.Image, path: str | os.PathLike, params: dict, outputs: FileSet | None = None) -> Path:
    """Write `image` to `path` with `params` in its metadata; atomic (temp file + rename). With
    `outputs` the file joins that set and appears only when the whole set is committed."""
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(params, sort_keys=True, default=str))
    info.add_text("parameters", ", ".join(f"{k}: {v}" for k, v in params.items()))
    with atomic_file(path) if outputs is None else outputs.file(path) as f:
        image.save(f, format="PNG", pnginfo=info)
    return Path(path)


def read_png_params(path: str | os.PathLike) -> dict:
    """The parameters saved by `save_png` (empty if the PNG has none)."""
    with Image.open(path) as im:
        text = im.text.get(METADATA_KEY) if hasattr(im, "text") else None
    return json.loads(text) if text else {}


def side_by_side(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """Images in one row, separated by white gaps."""
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    out = Image.new("RGB", (w, h), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def psnr(a, b, keep: np.ndarray | None = None) -> float:
    """PSNR in dB of two RGB images of one size (PIL images or uint8 (H, W, 3) arrays), over the
    pixels where `keep` (H, W) is True (default all); 100 dB if identical there."""
    x, y = (np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, dtype=np.float64) / 255.0 for im in (a, b))
    diff = x - y if keep is None else (x - y)[keep]
    mse = float(np.mean(diff**2))
    return 100.0 if mse < 1e-10 else 10 * float(np.log10(1 / mse))


def stacked(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """Images in one column, separated by white gaps."""
    w = max(im.width for im in images)
    h = sum(im.height for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (w, h), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out
