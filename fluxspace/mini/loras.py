"""The LoRAs shipped with flux-mini: where they are, and the style each one learned, as a transform and a score.

flux-mini never saw these styles: its training renders (render.py) are all drawn at full resolution. A
LoRA style is an image transform applied to ordinary renders with their ordinary captions
(train_lora.py), so that the LoRA turns every image into the style while the prompt still says what
is drawn; its score measures the style on any image, a render or a generation.

    pixel   pixel art: each PIXEL x PIXEL block of the image replaced by its mean colour (a
            downsampling by PIXEL, then nearest upsampling). Score: 1 - (mean step between
            neighbouring pixels inside a block) / (mean step across block edges): about 0 for a
            render, 1 for a pixelated one, 0.31 for a pixelated render after flux-mini's
            autoencoder (the best a generation can show: the decoder softens the block edges).

PIXEL = 2 (32 x 32 blocks in a 64 px image): with 4 px blocks the evaluator misreads ~20% of
mouths and eyewear even on exact renders, and the "what the LoRA keeps" measure would mostly
measure the referee; with 2 px blocks it reads pixelated renders as well as plain ones
(benchmarks/mini_lora.py, section "reference").
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

LORA_DIR = Path(__file__).resolve().parent / "weights" / "loras"
PIXEL = 2  # block side in pixels


def pixelate(images: Tensor, block: int = PIXEL) -> Tensor:
    """(B, 3, H, W) -> the same size in blocks of block x block pixels, each its mean colour."""
    if images.shape[-1] % block or images.shape[-2] % block:
        raise ValueError(f"image sides {tuple(images.shape[-2:])} must be multiples of the block side {block}")
    return F.interpolate(F.avg_pool2d(images, block), scale_factor=block, mode="nearest")  # (B, 3, H, W)


def pixel_score(images: Tensor, block: int = PIXEL) -> Tensor:
    """(B, 3, H, W) -> (B,) how blocky: 1 - inside-block step / across-edge step (0 plain, 1 pixelated)."""
    x = images.float()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2))  # (B, W-1) step between columns w, w+1
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 3))  # (B, H-1) step between rows h, h+1
    inside, across = [], []
    for steps in (dx, dy):
        edge = torch.zeros(steps.shape[1], dtype=torch.bool, device=steps.device)
        edge[block - 1 :: block] = True  # from the last pixel of a block to the next block's first
        inside.append(steps[:, ~edge])
        across.append(steps[:, edge])
    inside, across = torch.cat(inside, dim=1).mean(dim=1), torch.cat(across, dim=1).mean(dim=1)  # (B,), (B,)
    return 1 - inside / across.clamp_min(1e-8)


STYLES = {"pixel": pixelate}
SCORES = {"pixel": pixel_score}


def shipped_lora(name: str = "pixel") -> Path:
    """The path of a LoRA that ships with flux-mini (`weights/loras/<name>.safetensors`)."""
    names = sorted(p.stem for p in LORA_DIR.glob("*.safetensors"))
    path = LORA_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped flux-mini LoRA {name!r} in {LORA_DIR}; shipped: {', '.join(names) or 'none'}")
    return path
