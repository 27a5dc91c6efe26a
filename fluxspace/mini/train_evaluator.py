"""Train the attribute evaluator (evaluator.py) on renders of the domain, and measure it on fresh ones.

    python -m fluxspace.mini.train_evaluator --out fluxspace/mini/weights/evaluator.safetensors

The recipe:
1. Render a pool of faces once (data.make_faces, split "all": the evaluator must read the held-out
   combinations too, since prompt adherence is measured on them) and keep it in memory as uint8.
2. Train with the shared loop (train.py: AdamW, warmup + cosine, EMA, checkpoints), cross-entropy
   summed over the families, on augmented draws from the pool. The augmentations imitate what flux-mini
   generations look like next to renders: a little blur (the latent decoder), colour and contrast
   shifts, noise, and a shift of up to 3 px with +-3% scale. No flips: nothing in the domain is mirrored.
3. Re-estimate the BatchNorm statistics of the EMA weights on augmented pool images (the running
   statistics the loop copies belong to the live weights, not to their average).
4. Measure per-family accuracy on a validation set whose render seeds (>= 2**31) the pool never
   uses (its seeds come from rng.integers(2**31)), clean and augmented, and write the weights
   (float32) with the families, training settings and accuracies in the metadata, atomically.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from flux_core.atomic import atomic_file

from .attributes import FAMILIES, Attributes, sample_attributes
from .data import make_faces, render_many
from .evaluator import AttributeEvaluator, EvaluatorConfig, metadata_of
from .render import to_tensor
from .train import TrainConfig, train

# Render seeds of evaluation sets start here; training pools draw theirs below 2**31 (data.draw_attributes).
VALIDATION_SEEDS = 2**31
TEST_SEEDS = 2**31 + 10**6  # tests/test_evaluator.py

# Augmentation strengths (see augment).
SHIFT_PX = 6.0
SCALE = 0.05
BLUR_P, BLUR_SIGMA = 0.5, (0.3, 1.2)  # pixels, Gaussian
COLOUR_P, GAIN, OFFSET, CONTRAST = 0.8, 0.05, 0.04, 0.1  # per-channel gain and offset, global contrast
NOISE_P, NOISE_STD = 0.5, 0.05  # std in [-1, 1] units (up to ~6/255)


def labels_of(attrs: list[Attributes] | tuple[Attributes, ...]) -> Tensor:
    """(N, n_families) int64: each family's value index in FAMILIES order."""
    return torch.tensor([[FAMILIES[f].index(v) for f, v in a.as_dict().items()] for a in attrs])


def fresh_renders(n: int, attrs_seed: int, first_seed: int, size: int = 128, workers: int = 1):
    """n renders with attributes drawn uniformly over ALL combinations and render seeds first_seed + i."""
    rng = np.random.default_rng(attrs_seed)
    attrs = [sample_attributes(rng, "all") for _ in range(n)]
    seeds = [first_seed + i for i in range(n)]
    return render_many(attrs, seeds, size, workers), attrs


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> the same, shifted, blurred, colour-shifted and noised at random."""
    B, _, H, W = x.shape

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    def chosen(p):  # (B, 1, 1, 1): 1.0 where the sample gets this augmentation
        return (torch.rand(B, generator=generator) < p).float().view(B, 1, 1, 1)

    # Shift by up to SHIFT_PX pixels and scale by +-SCALE, edges replicated.
    scale = uniform(1 - SCALE, 1 + SCALE, B)
    shift = uniform(-SHIFT_PX, SHIFT_PX, B, 2) * 2 / torch.tensor([W, H])  # in grid units
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = F.affine_grid(theta, [B, 3, H, W], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, 3, H, W)

    # Gaussian blur with a per-sample sigma, as two 1-D passes of a depthwise conv.
    sigma = uniform(*BLUR_SIGMA, B) * chosen(BLUR_P).view(B) + 1e-3
    taps = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = repeat(kernel / kernel.sum(-1, keepdim=True), "b k -> (b c) 1 1 k", c=3)  # (B*3, 1, 1, 7)
    flat = rearrange(x, "b c h w -> 1 (b c) h w")
    flat = F.conv2d(F.pad(flat, (3, 3, 0, 0), mode="replicate"), kernel, groups=B * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, 3, 3), mode="replicate"), kernel.transpose(2, 3), groups=B * 3)
    x = rearrange(flat, "1 (b c) h w -> b c h w", b=B)  # (B, 3, H, W)

    # Colour: per-channel gain and offset, and contrast about the image mean.
    colour = chosen(COLOUR_P)
    gain = 1 + colour * uniform(-GAIN, GAIN, B, 3, 1, 1)
    offset = colour * uniform(-OFFSET, OFFSET, B, 3, 1, 1)
    contrast = 1 + colour * uniform(-CONTRAST, CONTRAST, B, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + contrast * (x * gain + offset - mean)

    noise = chosen(NOISE_P) * uniform(0, NOISE_STD, B, 1, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


def loss_fn_for(pool: np.ndarray, labels: Tensor, batch_size: int):
    """The train.py loss: a batch drawn from the pool, augmented, cross-entropy summed over families."""

    def loss_fn(model: nn.Module, generator: torch.Generator):
        index = torch.randint(len(pool), (batch_size,), generator=generator)
        x = augment(to_tensor(pool[index.numpy()]), generator)  # (B, 3, H, W)
        logits, _ = model(x)
        target = labels[index]  # (B, n_families)
        losses = [F.cross_entropy(logits[f], target[:, j]) for j, f in enumerate(FAMILIES)]
        errors = [(logits[f].argmax(-1) != target[:, j]).float().mean() for j, f in enumerate(FAMILIES)]
        return sum(losses), {"error": torch.stack(errors).mean()}

    return loss_fn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, pool: np.ndarray, batches: int, batch_size: int, seed: int):
    """Replace BatchNorm running statistics with the plain average over augmented pool batches."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for _ in range(batches):
        index = torch.randint(len(pool), (batch_size,), generator=generator)
        model(augment(to_tensor(pool[index.numpy()]), generator))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: Tensor, augmented: bool, seed: int = 0):
    """{family: fraction right} over the images (uint8 (N, H, W, 3)), optionally augmented."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    right = torch.zeros(len(FAMILIES))
    for i in range(0, len(images), 250):
        x = to_tensor(np.ascontiguousarray(images[i : i + 250]))
        if augmented:
            x = augment(x, generator)
        logits, _ = model(x)
        for j, f in enumerate(FAMILIES):
            right[j] += (logits[f].argmax(-1) == labels[i : i + 250, j]).sum()
    return {f: right[j].item() / len(images) for j, f in enumerate(FAMILIES)}


def save_evaluator(model: AttributeEvaluator, path: str | os.PathLike, extra: dict) -> Path:
    """float32 safetensors with the metadata load_evaluator checks, written atomically."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # atomic_file gives the file an ordinary mode (0644 under the usual umask): package data must be
    # readable by everyone.
    with atomic_file(path) as f:
        f.write(safetensors.torch.save(state, metadata=metadata_of(model.config, extra)))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write evaluator.safetensors")
    parser.add_argument(
        "--work", default="out/evaluator", help="checkpoints and the loss log (out/ is git-ignored)"
    )
    parser.add_argument("--pool", type=int, default=40000, help="renders in the training pool")
    parser.add_argument("--val", type=int, default=2000, help="fresh renders to measure on")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes for rendering")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds of training at most")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()

    faces = make_faces(args.pool, seed=1000 + args.seed, split="all", workers=args.workers)
    val_images, val_attrs = fresh_renders(args.val, 2000 + args.seed, VALIDATION_SEEDS, workers=args.workers)
    assert max(faces.seeds) < VALIDATION_SEEDS, "validation seeds must be unseen in training"
    rendered = time.monotonic() - started
    print(f"rendered {len(faces)} + {args.val} faces in {rendered:.0f} s", flush=True)

    torch.manual_seed(args.seed)
    model = AttributeEvaluator(EvaluatorConfig())
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(50, args.steps // 10),
        weight_decay=0.05, ema_decay=0.995, checkpoint_every=200, log_every=10, seed=args.seed,
    )  # fmt: skip
    loss_fn = loss_fn_for(faces.images, labels_of(faces.attrs), args.batch_size)
    result = train(
        model, loss_fn, config, args.work, resume=args.resume, time_limit=args.time_limit,
        progress=False, desc="evaluator",
    )  # fmt: skip
    trained = time.monotonic() - started - rendered
    print(f"trained {result.step} steps in {trained:.0f} s (loss {result.loss:.4f})", flush=True)

    evaluator = recalibrate_batchnorm(result.ema, faces.images, 40, 128, seed=args.seed)
    val_labels = labels_of(val_attrs)
    clean = accuracy(evaluator, val_images, val_labels, augmented=False)
    augmented = accuracy(evaluator, val_images, val_labels, augmented=True, seed=1)
    for f in FAMILIES:
        print(f"{f:>10}: clean {clean[f]:.2%}  augmented {augmented[f]:.2%}", flush=True)
    extra = {
        "steps": result.step, "batch_size": args.batch_size, "pool": args.pool, "seed": args.seed,
        "train_seconds": round(trained), "validation_images": args.val,
        "validation_seeds": f"{VALIDATION_SEEDS}+i", "accuracy_clean": clean, "accuracy_augmented": augmented,
    }  # fmt: skip
    path = save_evaluator(evaluator, args.out, extra)
    worst = min(min(clean.values()), min(augmented.values()))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); worst family accuracy {worst:.2%}; "
          f"total {time.monotonic() - started:.0f} s", flush=True)  # fmt: skip
    print(json.dumps({"clean": clean, "augmented": augmented}), flush=True)
    if not math.isfinite(result.loss):
        raise SystemExit("training diverged (loss is not finite)")


if __name__ == "__main__":
    main()
