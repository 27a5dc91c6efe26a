"""The training loop of flux-mini, shared by the autoencoder (train_ae.py) and the flow model (train_flow.py).

What a loss is lives in those two files; this one holds what every run needs around it:

    AdamW, linear warmup then cosine decay of the learning rate, gradient clipping,
    an exponential moving average (EMA) of the weights (the EMA is what gets released),
    optional bf16 autocast on a GPU, a progress bar, a JSONL loss log, and checkpoints
    that resume bit for bit.

Everything random in a step (which images, which captions, noise, t) comes from ONE CPU
torch.Generator that the loop owns and checkpoints, so a run split into pieces (N/2 + N/2 steps,
or one GPU command per 10 minutes) ends in exactly the state of an uninterrupted run. Indices are
drawn from it directly; large noise tensors from a generator on the training device seeded from it
(`fork_generator`), because drawing megabytes of noise on the CPU and copying them would cost a GPU
step more than the step itself. (So a CUDA run and a CPU run of one seed see different noise.)

Files in `folder`:  checkpoint.safetensors (model, EMA, optimizer, step, generator state, seconds,
                                  config; no pickle: see checkpoint.py for the layout)
                    log.jsonl     one line per `log_every` steps: step, loss, lr, grad_norm, seconds
                                  (of training so far, counted on across resumes)
"""

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flux_core.atomic import atomic_file

from .checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.safetensors"
# What the loop wrote before checkpoints left pickle (torch.save); such a folder cannot be resumed.
OLD_CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"

# A loss function gets the model (in training mode) and the run's generator, draws its own batch and
# returns the scalar loss plus extra numbers to log (e.g. the AE's KL term).
LossFn = Callable[[nn.Module, torch.Generator], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # total optimizer steps; the cosine decay ends here
    batch_size: int
    lr: float
    warmup_steps: int = 0  # linear ramp from 0, so the first large gradients of a fresh model do no harm
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio rather than 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    bf16: bool = False  # autocast matmuls to bf16 on CUDA (the master weights stay float32)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1; got {self.steps} and {self.batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")


# Fields that may change when a run is resumed: they do not change what a step computes. (`steps`
# must match: the cosine schedule is laid out over it.)
RESUMABLE_CHANGES = ("checkpoint_every", "log_every")


def fork_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A fresh generator on `device`, seeded from `generator` (advancing it by one draw)."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then a half cosine from lr down to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


class EMA:
    """A shadow copy of the model whose weights trail the trained ones: w_ema <- d w_ema + (1 - d) w.

    The average over the last ~1/(1-d) steps is smoother than any single step's weights and samples
    better (standard since DDPM and DiT). The effective decay starts low, d_t = min(d, (1+t)/(10+t)),
    so that a short run's EMA is not still mostly the random initialisation (0.999^100 = 0.90).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for ema, new in zip(self.model.parameters(), model.parameters(), strict=True):
            ema.lerp_(new.detach(), 1 - d)
        for ema, new in zip(self.model.buffers(), model.buffers(), strict=True):
            ema.copy_(new)


@dataclass
class TrainResult:
    model: nn.Module  # the trained weights (last step)
    ema: nn.Module  # the averaged weights: what gets released
    step: int  # steps done so far
    total: int  # config.steps
    loss: float  # mean loss of the last logged interval (nan if none)

    @property
    def finished(self) -> bool:
        return self.step >= self.total


def _check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    now = asdict(config)
    diff = [
        f"{k}: {saved.get(k)!r} -> {now[k]!r}"
        for k in now
        if k not in RESUMABLE_CHANGES and _plain(saved.get(k)) != _plain(now[k])
    ]
    if diff:
        raise ValueError(
            f"cannot resume from {path}: the run was started with other settings ({'; '.join(diff)}); "
            "resume with the same settings or start afresh without resume"
        )


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def _trim_log(path: Path, step: int) -> dict:
    """Drop log lines written after the checkpoint we resume from (a run killed between the two);
    returns the last line kept ({} if none)."""
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    rows = [row for row in rows if row["step"] <= step]
    with atomic_file(path, "w") as f:  # killed here, the old log stays whole
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    return rows[-1] if rows else {}


def train(
    model: nn.Module,
    loss_fn: LossFn,
    config: TrainConfig,
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    resume: bool = False,
    stop_at: int | None = None,
    time_limit: float | None = None,
    progress: bool = True,
    desc: str = "train",
    init: dict | None = None,
) -> TrainResult:
    """Train `model` in place for config.steps steps of `loss_fn`, checkpointing into `folder`.

    resume: continue from folder/checkpoint.safetensors if there is one (same config required; one
    written by this version: an old checkpoint.pt is refused); without it a run starts from step 0 and
    replaces an old checkpoint and log.
    stop_at: stop after this step (checkpointing), as if interrupted; a later resume finishes the run.
    time_limit: seconds; stop (checkpointing) at the first step boundary past it.
    init: {"model": state_dict, "ema": state_dict} to start a fresh run from (a second stage that
    goes on from an earlier run's weights with a schedule of its own); ignored when resuming.
    """
    device = torch.device(device)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = folder / CHECKPOINT, folder / LOG

    model.to(device).train()
    # Decay only matrices (weights of Linear/Conv); norms' scales and biases keep their values.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )
    ema = EMA(model, config.ema_decay)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    step = 0
    # Training seconds before this call (the log's "seconds" go on across resumes) and the loss of
    # the last logged interval (what a resumed, already finished run reports).
    elapsed, last_loss = 0.0, float("nan")

    if resume and not ckpt_path.is_file() and (folder / OLD_CHECKPOINT).is_file():
        raise ValueError(
            f"cannot resume from {folder / OLD_CHECKPOINT}: checkpoints of that format (pickle) are no longer "
            f"read; resume needs a {CHECKPOINT} written by this version: start afresh without resume"
        )
    if resume and ckpt_path.is_file():
        # Loaded on the CPU: the generator state must stay a CPU tensor; load_state_dict copies the
        # weights onto the model's device and the optimizer moves its moments next to them.
        state = load_checkpoint(ckpt_path)
        _check_resumable(state["config"], config, ckpt_path)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
        last_row = _trim_log(log_path, step)
        elapsed = state["seconds"]
        last_loss = last_row.get("loss", last_loss)
    else:
        log_path.unlink(missing_ok=True)
        ckpt_path.unlink(missing_ok=True)
        (folder / OLD_CHECKPOINT).unlink(missing_ok=True)
        if init is not None:
            model.load_state_dict(init["model"])
            ema.model.load_state_dict(init["ema"])

    def save() -> None:
        save_checkpoint(
            ckpt_path, model.state_dict(), ema.model.state_dict(), optimizer.state_dict(), generator.get_state(),
            step=step, seconds=elapsed + time.monotonic() - started, config=asdict(config),
        )  # fmt: skip

    end = config.steps if stop_at is None else min(config.steps, stop_at)
    use_autocast = config.bf16 and device.type == "cuda"
    started = time.monotonic()
    # Sums over the current log interval, kept on the device: .item() every step would sync a GPU.
    interval_sum, interval_steps = {}, 0
    bar = tqdm(total=config.steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
    with open(log_path, "a") as log:
        while step < end:
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                loss, extras = loss_fn(model, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            ema.update(model, step)
            step += 1

            for name, value in {"loss": loss, "grad_norm": grad_norm, **extras}.items():
                interval_sum[name] = interval_sum.get(name, 0.0) + value.detach().float()
            interval_steps += 1
            if step % config.log_every == 0 or step == end:
                row = {"step": step, "lr": lr, "seconds": round(elapsed + time.monotonic() - started, 3)}
                row |= {k: v.item() / interval_steps for k, v in interval_sum.items()}
                log.write(json.dumps(row) + "\n")
                log.flush()
                last_loss = row["loss"]
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                interval_sum, interval_steps = {}, 0
            bar.update(1)
            if step % config.checkpoint_every == 0:
                save()
            if time_limit is not None and time.monotonic() - started > time_limit:
                break
    bar.close()
    save()
    return TrainResult(model=model, ema=ema.model, step=step, total=config.steps, loss=last_loss)
