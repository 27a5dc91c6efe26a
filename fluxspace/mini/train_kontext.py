"""Training flux-mini-kontext: flux-mini fine-tuned to edit a face by instruction, as FLUX.1 Kontext does.

    python -m fluxspace.mini.train_kontext --out FOLDER [--steps 2000] [--batch 32] [--lr 2e-4]
        [--pairs 8000] [--seed 0] [--resume] [--time-limit SECONDS] [--device cuda]

Data (edit_pairs.py): --pairs instruction-edit pairs of the training split: a render (the image to
edit), an instruction, and the same face with that one change. Both renders are encoded with
flux-mini's autoencoder, the instructions with its text encoders (a few dozen phrasings, encoded once).

Model: flux-mini's transformer, unchanged in shape (Kontext [dev] is FLUX.1-dev's shape too); it
starts from flux-mini's released weights and learns to use the conditioning tokens: the image to
edit, packed like the latents and appended after the noisy tokens with ids on RoPE axis 0 set to 1
(flux_core.sampling.Condition). The loss is flux-mini's rectified-flow loss on the noisy tokens
(train_flow.rectified_flow_loss with `condition=`); the instruction is dropped ("") with
probability CAPTION_DROPOUT, so the same model gives the image-conditioned unconditional branch of
true CFG. The loop is flux-mini's (train.py: AdamW, warmup + cosine, clipping, EMA, checkpoints
that resume bit for bit, a JSONL log).

Output (--out, written atomically): `flux-mini-kontext.safetensors`, the EMA weights (bf16, as
flux-mini ships) in the official layout with our metadata (preset flux-mini-kontext, how it was trained). The
autoencoder and text encoders are flux-mini's (resolve with --ae / --text-encoders, or use the
shipped name `--model flux-mini-kontext`). Files in --work: checkpoint.safetensors, log.jsonl,
data.safetensors (the encoded pairs, reused by --resume).

Letters: N pairs, Z latent channels, h w latent size.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from flux_core.atomic import atomic_file
from flux_core.inference import flux_metadata
from flux_core.model import Flux

from .data import render_many
from .edit_pairs import draw_pairs
from .render import to_tensor
from .train import TrainConfig, train
from .train_flow import CAPTION_DROPOUT, CaptionBank, encode_captions, rectified_flow_loss
from .train_lora import load_data, save_data

TRANSFORMER_FILE = "flux-mini-kontext.safetensors"


def pair_data(models, n: int, seed: int) -> tuple[Tensor, CaptionBank]:
    """n training pairs as latents (N, 2, Z, h, w) (the image to edit, the edited image) and their
    instructions encoded (one per pair)."""
    pairs = draw_pairs(n, seed, "train")
    size = models.preset.default_size
    latents = []
    for i in range(0, n, 64):
        chunk = pairs[i : i + 64]
        seeds = [p.seed for p in chunk]
        both = []
        for attrs in ([p.source for p in chunk], [p.target for p in chunk]):
            x = to_tensor(render_many(attrs, seeds, size)).to(models.device, models.dtype)  # (b, 3, H, W)
            both.append(models.ae.encode(x).float().cpu())  # (b, Z, h, w)
        latents.append(torch.stack(both, dim=1))  # (b, 2, Z, h, w)
    bank = encode_captions(models.text, [[p.instruction] for p in pairs])
    return torch.cat(latents), bank


def kontext_loss(latents: Tensor, bank: CaptionBank, batch_size: int, caption_dropout: float, device):
    """The loss function of train.train: a batch of pairs, the instruction (or "" with probability
    caption_dropout), the rectified-flow loss of the edited image conditioned on the image to edit."""
    latents = latents.to(device, torch.float32)
    txt, vec, ids = bank.txt.to(device), bank.vec.to(device), bank.ids.cpu()
    n = ids.shape[0]

    def loss_fn(model: Flux, generator: torch.Generator):
        index = torch.randint(n, (batch_size,), generator=generator)
        dropped = torch.rand(batch_size, generator=generator) < caption_dropout
        rows = torch.where(dropped, 0, ids[index, 0]).to(device)  # (B,) row 0 is ""
        pair = latents[index.to(device)]  # (B, 2, Z, h, w)
        loss = rectified_flow_loss(model, pair[:, 1], txt[rows].float(), vec[rows].float(), generator,
                                   condition=pair[:, 0])  # fmt: skip
        return loss, {}

    return loss_fn


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write flux-mini-kontext.safetensors into")
    p.add_argument("--model", type=Path, default=None, help="flux-mini folder to start from (default: the shipped one)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pairs", type=int, default=8000, help="training pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs and the steps")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the released weights")
    p.add_argument("--work", type=Path, default=None, help="checkpoint folder (default: OUT/../flux-mini-kontext-work)")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint in --work")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop (checkpointed) past it, exit 3")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="where the data is encoded and the model trained (cpu, cuda)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if not (args.lr > 0 and args.lr < 1):
        p.error(f"--lr must be in (0, 1); got {args.lr}")
    return args


def main(argv=None) -> int:
    from fluxspace.models import load_models

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or args.out.parent / "flux-mini-kontext-work"
    work.mkdir(parents=True, exist_ok=True)
    base = load_models(args.model, device=args.device)  # flux-mini: its AE and text encoders make the data, its weights the start
    key = {"pairs": args.pairs, "seed": args.seed, "model": str(base.paths.transformer)}
    data = load_data(work / "data.safetensors", key)
    if data is None:
        t0 = time.perf_counter()
        data = pair_data(base, args.pairs, args.seed)
        save_data(work / "data.safetensors", *data, key)
        print(f"encoded {args.pairs} pairs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    latents, bank = data
    model = base.flow.float().requires_grad_(True)  # the loader hands out a frozen model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup,
                         ema_decay=args.ema, seed=args.seed, checkpoint_every=100)  # fmt: skip
    loss_fn = kontext_loss(latents, bank, args.batch, CAPTION_DROPOUT, args.device)
    result = train(model, loss_fn, config, work, args.device, resume=args.resume, time_limit=args.time_limit, desc="kontext",
                   init={"model": start, "ema": start})  # fmt: skip
    if not result.finished:
        print(f"stopped at step {result.step} of {result.total}; --resume goes on", file=sys.stderr)
        return 3
    meta = flux_metadata(model.params, preset="flux-mini-kontext")
    with safetensors.safe_open(base.paths.transformer, framework="pt") as f:  # a second stage keeps the first's record
        base_training = json.loads((f.metadata() or {}).get("training", "null"))
    meta["training"] = json.dumps({"base": base.paths.transformer.name, "base_training": base_training,
                                   "device": args.device, "steps": args.steps, "batch": args.batch,
                                   "lr": args.lr, "pairs": args.pairs, "seed": args.seed, "ema": args.ema,
                                   "final_loss": result.loss})  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    # stored as flux-mini ships (bf16), read back in any compute dtype
    tensors = {k: v.to("cpu", torch.bfloat16).contiguous() for k, v in result.ema.state_dict().items()}
    with atomic_file(args.out / TRANSFORMER_FILE) as f:
        f.write(safetensors.torch.save(tensors, metadata=meta))
    print(args.out / TRANSFORMER_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
