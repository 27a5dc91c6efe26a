"""Training a LoRA on flux-mini's transformer: a style the base model never saw, from renders of its domain.

    python -m fluxspace.mini.train_lora --out pixel.safetensors [--style pixel] [--rank 8] [--alpha 8]
        [--targets "double_blocks.*.img_attn.qkv,..."] [--steps 1500] [--lr 1e-3] [--batch 32] [--seed 0]

The base model is frozen; only the factors of a low-rank update (Hu et al. 2021, arXiv 2106.09685)
of each target Linear train: delta W = (alpha / r) B A, A (r, in) small random, B (out, r) zeros,
so training starts from the base model exactly (PEFT's initialisation). The forward runs through
flux_core.lora: each step attaches the factors to the model as LoraLinear updates (`attach`), so
the LoRA trained is the LoRA applied, with no second implementation of it; `detach` restores the
model after the step.

Data (loras.py: STYLES): --images renders of the training split at the model's size, each turned
into the style, encoded with flux-mini's autoencoder; their usual captions (data.caption_sets),
encoded once with its text encoders. The loss is flux-mini's own (train_flow.caption_loss: the
rectified-flow loss with caption dropout), so the LoRA learns "every image in the style" while the
prompts keep saying what is drawn; caption dropout teaches it the unconditional branch of CFG too.

The loop is flux-mini's (train.py: AdamW, warmup + cosine, clipping, EMA, progress, JSONL log,
checkpoints that resume bit for bit); it trains `LoraFactors`, a module holding only the factors, so
its EMA and checkpoints hold only them. Files in --work: checkpoint.safetensors, log.jsonl,
data.safetensors (the encoded data, reused by --resume).

Output: the EMA factors as a LoRA file in the official (bfl) form, `<module>.lora_A.weight` = A
(r, in) and `<module>.lora_B.weight` = (alpha / r) B (out, r): alpha folded in, so any reader applies
it at strength 1 as trained (flux_core.lora.read_lora). Its metadata records how it was made.
Written atomically.

Letters: R rank, I in features, O out features, N images, K captions per image.
"""

import argparse
import fnmatch
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from flux_core.atomic import atomic_file
from flux_core.lora import LoraScales, LowRank, attach, detach, file_sha256, linear_shapes
from flux_core.model import Flux
from fluxspace.models import flux_mini_path, load_models

from .data import caption_sets, make_faces
from .loras import STYLES
from .train import TrainConfig, TrainResult, train
from .train_flow import CAPTION_DROPOUT, CaptionBank, caption_loss, encode_captions

FORMAT = "flux-mini LoRA"
# The attention and MLP Linears of every block (the modulation, embedders and final layer stay).
DEFAULT_TARGETS = (
    "double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.img_mlp.0",
    "double_blocks.*.img_mlp.2", "double_blocks.*.txt_attn.qkv", "double_blocks.*.txt_attn.proj",
    "double_blocks.*.txt_mlp.0", "double_blocks.*.txt_mlp.2", "single_blocks.*.linear1", "single_blocks.*.linear2",
)  # fmt: skip
NAME = "lora"  # the name of the LoRA while it trains (LoraScales key, buffer prefix)
DATA = "data.safetensors"


@dataclass(frozen=True)
class LoraConfig:
    """What the LoRA is: its rank, alpha (strength alpha / rank) and the Linears it updates (name patterns)."""

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1; got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number; got {self.alpha!r}")
        if not self.targets:
            raise ValueError("targets is empty: name at least one Linear pattern, e.g. double_blocks.*.img_attn.qkv")


def target_patterns(names) -> list[str]:
    """The module names with block numbers written as `*`: the patterns valid as targets."""
    return sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})


def resolve_targets(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Module name -> weight shape (O, I) of every Linear of `model` matched by a pattern (fnmatch, `*`
    any text); a ValueError listing the valid patterns if one matches no Linear."""
    shapes = linear_shapes(model)
    chosen = {}
    for pattern in patterns:
        hits = [n for n in shapes if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"target {pattern!r} matches no Linear of the model; valid: {', '.join(target_patterns(shapes))}")
        chosen |= {n: shapes[n] for n in hits}
    return dict(sorted(chosen.items(), key=lambda item: list(shapes).index(item[0])))  # model order


def _key(module: str) -> str:
    return module.replace(".", "__")  # ParameterDict keys cannot hold dots


class LoraFactors(nn.Module):
    """The trainable part of a LoRA: A (R, I) and B (O, R) of each target Linear, as Parameters.

    A starts uniform in +-1/sqrt(I) (PEFT's kaiming_uniform(a=sqrt(5)) bound), B at zero: delta W = 0.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], config: LoraConfig, seed: int = 0):
        super().__init__()
        self.targets = tuple(shapes)
        self.scale = config.alpha / config.rank
        g = torch.Generator().manual_seed(seed)
        r = config.rank
        self.down = nn.ParameterDict(
            {_key(n): nn.Parameter((torch.rand(r, i, generator=g) * 2 - 1) / math.sqrt(i)) for n, (o, i) in shapes.items()}
        )
        self.up = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(o, r)) for n, (o, i) in shapes.items()})

    def updates(self) -> dict[str, LowRank]:
        """Module name -> LowRank(A, (alpha / r) B): what flux_core.lora applies (gradients flow through)."""
        return {n: LowRank(self.down[_key(n)], self.up[_key(n)] * self.scale) for n in self.targets}

    def tensors(self) -> dict[str, Tensor]:
        """The official (bfl) form: <module>.lora_A.weight (R, I), <module>.lora_B.weight (O, R), alpha folded in."""
        out = {}
        for name, update in self.updates().items():
            out[f"{name}.lora_A.weight"] = update.down.detach().float().cpu().contiguous()
            out[f"{name}.lora_B.weight"] = update.up.detach().float().cpu().contiguous()
        return out


def train_lora(
    flow: Flux,
    latents: Tensor,
    bank: CaptionBank,
    lora: LoraConfig,
    config: TrainConfig,
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    resume: bool = False,
    caption_dropout: float = CAPTION_DROPOUT,
    **kwargs,
) -> tuple[TrainResult, dict[str, tuple[int, int]]]:
    """Train a LoRA of `flow` (left unchanged) on (latents (N, Z, h, w), bank.ids (N, K)); kwargs go to
    train.train. Returns the run (its .ema is the LoraFactors to release) and the targets' shapes."""
    shapes = resolve_targets(flow, lora.targets)
    flow.to(device).requires_grad_(False)
    factors = LoraFactors(shapes, lora, config.seed)
    base_loss = caption_loss(latents, bank, config.batch_size, caption_dropout, device)

    def loss_fn(factors: LoraFactors, generator: torch.Generator):
        attach(flow, NAME, factors.updates(), LoraScales({NAME: 1.0}))
        try:
            return base_loss(flow, generator)
        finally:
            detach(flow)

    return train(factors, loss_fn, config, folder, device, resume=resume, desc="lora", **kwargs), shapes


def save_lora(path: str | os.PathLike, factors: LoraFactors, metadata: dict) -> Path:
    """Write the LoRA file (official form, alpha folded in) atomically; metadata values become JSON text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = {"format": FORMAT} | {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_file(path) as f:
        f.write(safetensors.torch.save(factors.tensors(), metadata=text))
    return path


# ----------------------------------------------------------------------------------------------
# Data: renders in the style, with their usual captions


@torch.no_grad()
def style_data(models, style: str, n: int, seed: int, captions_per_image: int = 4) -> tuple[Tensor, CaptionBank]:
    """n training-split renders at the model's size, turned into `style`, as normalised latents
    (N, Z, h, w), and their captions encoded (K per image)."""
    faces = make_faces(n, seed, models.preset.default_size, "train")
    transform = STYLES[style]
    latents = []
    for i in range(0, n, 64):
        x = transform(faces.tensor(slice(i, i + 64))).to(models.device, models.dtype)  # (b, 3, H, W)
        latents.append(models.ae.encode(x).float().cpu())  # (b, Z, h, w)
    bank = encode_captions(models.text, caption_sets(faces.attrs, captions_per_image, seed))
    return torch.cat(latents), bank


def save_data(path: Path, latents: Tensor, bank: CaptionBank, key: dict) -> None:
    tensors = {k: v.contiguous() for k, v in {"latents": latents, "txt": bank.txt, "vec": bank.vec, "ids": bank.ids}.items()}
    metadata = {"key": json.dumps(key), "captions": json.dumps(bank.captions)}
    with atomic_file(path) as f:
        f.write(safetensors.torch.save(tensors, metadata=metadata))


def load_data(path: Path, key: dict) -> tuple[Tensor, CaptionBank] | None:
    """The data saved at `path` if it was made with the same `key` (style, images, seed, ...), else None."""
    if not path.is_file():
        return None
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        if json.loads(metadata["key"]) != key:
            return None
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return t["latents"], CaptionBank(t["txt"], t["vec"], t["ids"], tuple(json.loads(metadata["captions"])))


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--model", type=Path, default=None, help="flux-mini folder (default: the shipped one)")
    p.add_argument("--style", default="pixel", help=f"the style to learn: {', '.join(STYLES)}")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0, help="strength alpha / rank (folded into lora_B)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated Linear name patterns")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the steps")
    p.add_argument("--images", type=int, default=4000, help="training renders")
    p.add_argument("--captions", type=int, default=4, help="captions per image")
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the released factors")
    p.add_argument("--work", type=Path, default=None, help="checkpoint folder (default: OUT without suffix + '-work')")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint in --work")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop (checkpointed) past it, exit 3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.style not in STYLES:
        raise SystemExit(f"unknown style {args.style!r}; valid: {', '.join(STYLES)}")
    try:
        lora = LoraConfig(args.rank, args.alpha, tuple(t.strip() for t in args.targets.split(",") if t.strip()))
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=min(50, args.steps // 10),
            ema_decay=args.ema, checkpoint_every=100, seed=args.seed,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"train_lora: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or flux_mini_path()
    models = load_models(model_dir, device=args.device)
    try:
        resolve_targets(models.flow, lora.targets)
    except ValueError as e:
        raise SystemExit(f"train_lora: {e}") from None
    work = args.work or args.out.with_name(args.out.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    key = {"style": args.style, "images": args.images, "seed": args.seed, "captions": args.captions,
           "model": str(model_dir), "size": models.preset.default_size}  # fmt: skip
    data = load_data(work / DATA, key) if args.resume else None
    if data is None:
        print(f"rendering and encoding {args.images} {args.style} faces", file=sys.stderr, flush=True)
        data = style_data(models, args.style, args.images, args.seed, args.captions)
        save_data(work / DATA, *data, key)
    latents, bank = data
    data_seconds = time.monotonic() - t0

    run, shapes = train_lora(
        models.flow, latents, bank, lora, config, work, args.device, resume=args.resume, time_limit=args.time_limit,
    )  # fmt: skip
    if not run.finished:
        print(f"stopped at step {run.step} of {run.total}; go on with --resume", file=sys.stderr)
        return 3
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines() if line]
    transformer = Path(model_dir) / "flux-mini.safetensors"
    metadata = {
        "rank": lora.rank, "alpha": lora.alpha, "alpha_folded": "lora_B = (alpha / rank) B: apply at strength 1",
        "targets": list(lora.targets), "modules": list(shapes), "steps": run.step, "seed": args.seed,
        "train": asdict(config), "final_loss": run.loss, "train_seconds": log[-1]["seconds"],
        "data_seconds": round(data_seconds, 1),
        "trained_on": {"style": args.style, "images": args.images, "split": "train", "size": key["size"],
                       "captions_per_image": args.captions, "caption_dropout": CAPTION_DROPOUT,
                       "data_seed": args.seed, "renderer": "fluxspace.mini.render"},
        "base_model": {"preset": models.preset.name, "transformer_sha256": file_sha256(transformer)
                       if transformer.is_file() else None},
        "trainer": "python -m fluxspace.mini.train_lora",
    }  # fmt: skip
    save_lora(args.out, run.ema, metadata)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB, {len(shapes)} Linears, rank {lora.rank}); final loss {run.loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
